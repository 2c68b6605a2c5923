"""The four UniMRG tasks and their names, shared by config, data, objective and models."""

UND, PIX, DEPTH, SEG = "und", "pix", "depth", "seg"
TASKS = (UND, PIX, DEPTH, SEG)          # the order of the round-robin schedule
GENERATION_TASKS = (PIX, DEPTH, SEG)    # conditioned on the input image's understanding features
