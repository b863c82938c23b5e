# The worker and trainer image for docker-compose.yml (users with a Docker engine).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY models ./models
COPY training ./training
# The onnx extra: INTENTSTREAM_RUNTIME=onnx|onnx-int8 and `intentstream export`
RUN pip install --no-cache-dir ".[onnx]"
ENV INTENTSTREAM_STATE_DIR=/var/lib/intentstream \
    INTENTSTREAM_MODEL_DIR=/models
ENTRYPOINT ["intentstream"]
CMD ["worker"]
