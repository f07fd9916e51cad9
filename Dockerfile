FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends dicom3tools dcmtk && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/pacsnode
COPY pyproject.toml ./
COPY node node
COPY pipelines pipelines
COPY training training
COPY migrations migrations
COPY config.yaml alembic.ini ./
RUN pip install --no-cache-dir -e ".[inference]"
USER nobody
