# One image for every plane; the Kubernetes manifests pick the plane with
# `command: ["python", "-m", "<plane>"]`. Build: docker build -t triplane .
# (.dockerignore keeps the venv, state, tests and benchmarks out.)
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY . /src
RUN pip install --no-compile /src && rm -rf /src \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin triplane
WORKDIR /var/lib/triplane
USER 10001
EXPOSE 50051 50061 50062 50063
CMD ["python", "-m", "money_plane"]
