# syntax=docker/dockerfile:1
# The job image: Ray plus this project, for every pod of k8s/rayjob.yaml and for ray_cluster.yaml.
#   docker build -t registry.example.com/deeplab-pipeline:0.1.0 .
# One image serves CPU and GPU nodes: PyPI's Linux torch wheels carry their own CUDA runtime, so a
# GPU node needs only the NVIDIA driver (and device plugin), not a CUDA base image.
# The Ray version must match the `ray` pin in pyproject.toml (tests/test_cluster_config.py checks it).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311

FROM ${RAY_IMAGE} AS wheels
# pydensecrf2 is published as an sdist only: compile it here so the final image has no compiler.
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
USER 1000:100
COPY --chown=1000:100 . /home/ray/src
# Wheels for the project and every dependency; the pip cache mount keeps rebuilds after a code
# change from downloading torch again.
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 \
    pip wheel --wheel-dir /home/ray/wheels /home/ray/src

FROM ${RAY_IMAGE}
# Numeric user (rayproject/ray's `ray`, uid 1000, group users): lets Kubernetes verify runAsNonRoot.
USER 1000:100
WORKDIR /home/ray/app
# The wheels are bind-mounted, not copied, so they add nothing to this image's layers.
RUN --mount=type=bind,from=wheels,source=/home/ray/wheels,target=/tmp/wheels \
    pip install --no-cache-dir --no-index --find-links /tmp/wheels deeplab-pipeline
# jobs/ (the entry points) is not part of the package; the RayJob runs `python jobs/segment_bucket.py`
# from this WORKDIR, which is also the working dir KubeRay starts Ray in.
COPY --chown=1000:100 . /home/ray/app
# The pods run with a read-only root filesystem and a writable /tmp.
ENV MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache
