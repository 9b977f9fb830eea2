# Two images. The default target (the last stage, `docker build -t triplane .`)
# is the one image of every plane; the Kubernetes manifests pick the plane
# with `command: ["python", "-m", "<plane>"]`. `--target triton` is the AI
# plane's Triton sidecar (k8s/base/ai-plane.yaml).
# (.dockerignore keeps the venv, state, tests and benchmarks out.)

# The Triton sidecar: the official Triton Inference Server image of the
# release the project runs everywhere else (tritonserver 2.51.0, NGC 24.10:
# the binary nvidia-pytriton 0.7.0 ships), plus what the Python-backend model
# imports (ai_plane/triton_backend/model.py: lightgbm and numpy, the versions
# pyproject.toml takes), which the official image lacks. The model files
# themselves come from the AI plane at run time (a shared volume).
# Build: docker build --target triton -t triplane-triton .
FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS triton
RUN python3 -m pip install --no-cache-dir "lightgbm==4.7.0" "numpy>=1.26,<2"
USER 10001

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY . /src
RUN pip install --no-compile /src && rm -rf /src \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin triplane
WORKDIR /var/lib/triplane
USER 10001
EXPOSE 50051 50061 50062 50063
CMD ["python", "-m", "money_plane"]
