"""Development tools shipped with the package: throwaway clusters for tests, benchmarks and the demo."""
