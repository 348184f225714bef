FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY batchroute ./batchroute
COPY workers ./workers
COPY jobs ./jobs
RUN pip install --no-cache-dir '.[postgres,flower]'
CMD ["celery", "-A", "workers", "worker"]
