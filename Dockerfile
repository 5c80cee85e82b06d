FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
COPY policies ./policies
# fast: uvloop; otlp: the OTLP span exporter (trace_exporter = otlp). gcc only for the
# build of the compiled loops (proxy/wire/_scan.c, proxy/analysis/_shape.c), removed again afterwards.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir ".[fast,otlp]" \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/log/purpose-proxy && chown nobody /var/log/purpose-proxy
USER nobody
# 6432: PostgreSQL clients; 9187: /metrics, /healthz, /readyz
EXPOSE 6432 9187
VOLUME /var/log/purpose-proxy
ENTRYPOINT ["purpose-proxy"]
CMD ["serve", "--listen", "0.0.0.0:6432", "--metrics-listen", "0.0.0.0:9187", "--audit-path", "/var/log/purpose-proxy/audit.jsonl"]
