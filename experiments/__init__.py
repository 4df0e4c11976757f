"""Reproducible optimizer comparisons: one module per experiment (`convergence`, `rosenbrock`,
`momentum`, `housing`, `boston`), each with a frozen `Config` and `run(config) -> Result`; the
shared `harness` (result files, tracking, progress), `data` loaders and the `optiscope` CLI."""
