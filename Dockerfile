# lensfeed: one image for producers and trainer (see docker-compose.yml).
#
# The base image must already hold torch: nothing multi-GB is downloaded while building. The
# default is the official CUDA runtime image (GPU nodes; it also runs on CPU). Any image with
# Python >= 3.10, pip and torch 2.2..2.14 works:
#   docker build --build-arg BASE_IMAGE=my-registry/torch:2.6-cuda12 -t lensfeed:local .
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# 1. Dependencies (a cached layer until pyproject.toml changes). The base image's torch is pinned
#    as a pip constraint, so pip keeps it instead of fetching another build from the index.
COPY pyproject.toml README.md ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
        > /etc/lensfeed-torch-constraint.txt \
    && mkdir -p common producer trainer src/lensfeed \
    && touch common/__init__.py producer/__init__.py trainer/__init__.py src/lensfeed/__init__.py \
    && pip install -c /etc/lensfeed-torch-constraint.txt . \
    && pip uninstall -y lensfeed \
    && rm -rf common producer trainer src build *.egg-info

# 2. The package itself, and the configs (`lensfeed demo` finds conf/ in the working directory).
COPY common ./common
COPY producer ./producer
COPY trainer ./trainer
COPY src ./src
RUN pip install --no-deps -c /etc/lensfeed-torch-constraint.txt . \
    && rm -rf build *.egg-info \
    && python -c "import torch, lensfeed.producer.main, lensfeed.trainer.main; print('lensfeed ok, torch', torch.__version__)"
COPY conf ./conf

CMD ["lensfeed", "--help"]
