//! pd-router: the entry point of the cluster. It serves the gRPC and OpenAI-style HTTP APIs and
//! assigns each request to a prefill and a decode worker.
