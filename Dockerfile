# Dockerfile
FROM python:3.13-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends git bubblewrap nftables util-linux \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .
RUN pip install --no-deps .

ENV ORCHESTRATOR_DATA_DIR=/data
# Workers run in a bubblewrap sandbox, which needs a container allowed to make namespaces and
# mounts (e.g. `docker run --privileged`, or a seccomp/AppArmor profile that permits them) and a
# writable cgroup. Elsewhere workers fail with the reason (also in /ready); set
# ORCHESTRATOR_SANDBOX=off to run them unsandboxed, relying on the container alone (docs/SANDBOX.md).
VOLUME ["/data"]
EXPOSE 8000

CMD ["uvicorn", "orchestrator.api.main:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "4"]
