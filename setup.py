"""One distribution for the postcode-reading edge appliance. The base install is what a site needs."""

import importlib.util
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup


def _build_shipped_selftest() -> None:
    """The shipped bundle's self-test (sites refuse a bundle without one) is not committed: it
    is the demo digits again, rebuilt here byte for byte (sync/selftest_file.py, standard
    library only: this runs before the install's own dependencies exist)."""
    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("selftest_file", here / "sync" / "selftest_file.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_shipped_selftest(here / "models" / "mnist-int8", here / "edge_agent" / "assets" / "demo_digits.npz")


_build_shipped_selftest()  # before the glob below, which puts it in the wheel

setup(
    name="postcode-edge",
    version="0.1.0",
    description="Edge appliance that reads handwritten postcodes with an int8 LiteRT model",
    python_requires=">=3.11",
    packages=find_packages(include=["edge_agent*", "training*", "quantize*", "sync*", "web*"]),
    package_data={"edge_agent": ["assets/*"], "web": ["templates/*", "static/*", "static/vendor/*"]},
    # The shipped model bundle travels in the wheel too: an installed agent finds it under
    # <venv>/share/postcode-edge/models/ (edge_agent.config.DEFAULT_BUNDLE).
    data_files=[("share/postcode-edge/models/mnist-int8", sorted(glob("models/mnist-int8/*")))],
    install_requires=[
        "ai-edge-litert>=1.2",
        "numpy>=1.26",
        "opencv-python-headless>=4.9",
        "paho-mqtt>=2.1,<3",
        "flask>=3.0",
        "psutil>=5.9",
        "prometheus-client>=0.20",
        "waitress>=3.0",
        "cryptography>=42",
    ],
    extras_require={
        # TensorFlow only where models are built, never on site hardware.
        "train": ["tensorflow-cpu>=2.16"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "amqtt>=0.11", "selenium>=4.20",
                # The rollout tests run the real Ansible playbooks and lint them.
                "ansible-core>=2.16", "ansible-lint>=24"],
        # An embedded MQTT broker so the demo runs where Mosquitto is not installed.
        "demo": ["amqtt>=0.11"],
    },
    entry_points={
        "console_scripts": [
            "edge-train=training.cli:main",
            "edge-quantize=quantize.cli:main",
            "edge-agent=edge_agent.cli:main",
            "edge-web=web.cli:main",
            "edge-sync=sync.cli:main",
        ]
    },
)
