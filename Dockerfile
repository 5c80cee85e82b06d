FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
# fast: uvloop; otlp: the OTLP span exporter (trace_exporter = otlp)
RUN pip install --no-cache-dir ".[fast,otlp]" \
    && mkdir -p /var/log/purpose-proxy && chown nobody /var/log/purpose-proxy
USER nobody
# 6432: PostgreSQL clients; 9187: /metrics, /healthz, /readyz
EXPOSE 6432 9187
VOLUME /var/log/purpose-proxy
ENTRYPOINT ["purpose-proxy"]
CMD ["serve", "--listen", "0.0.0.0:6432", "--metrics-listen", "0.0.0.0:9187", "--audit-path", "/var/log/purpose-proxy/audit.jsonl"]
