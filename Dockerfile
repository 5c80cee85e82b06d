FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
RUN pip install --no-cache-dir ".[fast]"
USER nobody
EXPOSE 6432 9187
ENTRYPOINT ["purpose-proxy"]
CMD ["serve", "--listen", "0.0.0.0:6432"]
