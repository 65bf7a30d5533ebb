from setuptools import find_packages, setup

setup(
    name='mpimoe',
    version='0.1.0',
    description='Mixture-of-Experts inference with large expert parallelism over MPI',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=find_packages(include=['mpimoe', 'mpimoe.*']),
    # tokenizers >= 0.21: DecodeStream (stop strings); jinja2 >= 3.1.6: the sandbox
    # fixes of 3.1.5/3.1.6 (chat templates are untrusted code); ml_dtypes < 0.7:
    # `import ml_dtypes` 0.7.0 costs 1.3-1.5 s of CPU per process (0.6.0: 0.16 s),
    # paid by every rank at start-up (README, "Start-up")
    install_requires=['mpi4py>=3.1', 'numpy>=1.24', 'h5py>=3.8', 'ml_dtypes>=0.3,<0.7',
                      'threadpoolctl>=3.1', 'tokenizers>=0.21', 'jinja2>=3.1.6'],
    extras_require={
        # an MPI library for machines that have none (clusters bring their own)
        'mpich': ['mpich'],
        'test': ['pytest>=7', 'pytest-timeout', 'psutil'],
        # CuPy >= 14 (BF16 arrays) for CUDA 12, or for CUDA 13, with the CUDA
        # headers its BF16 kernels compile against ([ctk]); CuPy registers
        # bfloat16 only with NumPy >= 2.1.2
        'gpu': ['cupy-cuda12x[ctk]>=14', 'numpy>=2.1.2'],
        'gpu-cuda13': ['cupy-cuda13x[ctk]>=14', 'numpy>=2.1.2'],
        # transformers pinned: the parity tests (tests/test_hf_parity.py) state the version
        'hf': ['torch==2.13.0', 'transformers==5.24.0', 'safetensors'],
        'report': ['matplotlib'],
    },
    entry_points={'console_scripts': ['mpimoe = mpimoe.cli.main:main']},
)
