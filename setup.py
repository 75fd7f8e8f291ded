"""One distribution for the postcode-reading edge appliance. The base install is what a site needs."""

from glob import glob

from setuptools import find_packages, setup

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
