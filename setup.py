"""pip install -e ".[test]"   (install torch first: `pip install torch==2.13.0` on CPU machines;
GPU users keep the CUDA torch they have — the range below is satisfied by it and pulls nothing)."""

from setuptools import find_packages, setup

setup(
    name="unimrg",
    version="0.1.0",
    description="UniMRG: multi-representation generation post-training for unified multimodal models "
                "(DeepSpeed + Megatron-Energon + SLURM)",
    python_requires=">=3.10",
    # Recipes and ZeRO configs travel as package data, so a non-editable `pip install .` finds them
    # (unimrg/config.py: RECIPES, DS_CONFIGS); ds_configs/ is installed as unimrg/ds_configs/.
    packages=[*find_packages(include=["unimrg", "unimrg.*", "launch"]), "unimrg.ds_configs"],
    package_dir={"unimrg.ds_configs": "ds_configs"},
    package_data={"launch": ["recipes/*.yaml"], "unimrg.ds_configs": ["*.json"]},
    entry_points={"console_scripts": ["unimrg-submit = launch.submit:main"]},
    install_requires=[
        "torch>=2.4",                 # satisfied by the torch already installed; never pulls a CUDA build over it
        "deepspeed==0.19.8",
        "transformers==5.24.0",
        "diffusers==0.42.1",
        "megatron-energon==7.4.1",
        "submitit==1.5.4",
        "tensorboard>=2.16",
        "omegaconf>=2.3",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "pillow>=10",
        "numpy>=1.26",
        "scipy>=1.11",
        "tqdm>=4.66",
    ],
    extras_require={"test": ["pytest>=8"]},
)
