# bidsharmony as a BIDS-App container.
#   docker build -t bidsharmony/bidsharmony:0.1.0 .                                   # CUDA build of torch
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t bidsharmony/bidsharmony:0.1.0-cpu .
#   docker run --rm -v /data/bids:/data:ro -v /data/out:/out bidsharmony/bidsharmony:0.1.0 /data /out participant
FROM python:3.11.7-slim-bookworm

ARG TORCH_VERSION=2.13.0
# The wheel index of the torch build: CUDA by default; .../whl/cpu for a CPU-only image (~5 GB smaller).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

LABEL org.opencontainers.image.title="bidsharmony" \
      org.opencontainers.image.description="Blind harmonization of T1w MRI with a normalizing-flow prior (BlindHarmony), as a BIDS-App" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="https://github.com/bidsharmony/bidsharmony" \
      org.opencontainers.image.licenses="Apache-2.0 AND CC-BY-SA-3.0" \
      org.opencontainers.image.vendor="bidsharmony developers"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # One thread per process by default: Nipype runs several nodes at once, and bidsharmony sets
    # torch's and ITK's threads per node from --omp-nthreads; unset, BLAS/ITK would oversubscribe.
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    MPLBACKEND=Agg

# torch first and pinned, from the chosen index, so the project's range is already satisfied.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /opt/bidsharmony
COPY pyproject.toml README.md constraints.txt ./
COPY bidsharmony ./bidsharmony
# The default model ships inside the package (bidsharmony/data/models): nothing is downloaded at run time.
# constraints.txt pins every other Python package to the versions this release was tested with.
RUN pip install --constraint constraints.txt . && bidsharmony --version

# A non-root user with a writable HOME (matplotlib, Nipype and pip caches); under Singularity the
# host user is used instead, and HOME is bound by the runtime.
RUN useradd --create-home --uid 1000 --shell /bin/bash bidsharmony
USER 1000:1000
ENV HOME=/home/bidsharmony
WORKDIR /home/bidsharmony

ENTRYPOINT ["bidsharmony"]
CMD ["--help"]
