# The last layers of pd-cluster:local, over the base image that deploy/docker/rootfs.sh makes
# from nothing (debootstrap). deploy/docker/build.sh stages the context: bin/ (pd-router,
# pd-prefill, pd-decode, pd-probe), models/ (the GGUF) and lib/ (CUDA libraries for the -gpu
# variant; empty otherwise). No registry is needed: BASE is a local image.
ARG BASE
FROM ${BASE}

# Largest and least often changed first, so a rebuild with new binaries reuses this layer.
COPY models/ /models/
COPY lib/ /usr/local/lib/pd-cluster/
RUN echo /usr/local/lib/pd-cluster > /etc/ld.so.conf.d/pd-cluster.conf && ldconfig
COPY bin/ /usr/local/bin/

ARG VARIANT=cpu
# Read by the NVIDIA container runtime on a GPU machine; empty (no GPU) in the CPU variant.
ARG NVIDIA_VISIBLE_DEVICES=""
ARG NVIDIA_DRIVER_CAPABILITIES=""
ENV PD_MODEL=/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES} \
    NVIDIA_DRIVER_CAPABILITIES=${NVIDIA_DRIVER_CAPABILITIES}
LABEL org.opencontainers.image.title="pd-cluster" \
      org.opencontainers.image.description="pd-router, pd-prefill, pd-decode, pd-probe, etcd and the SmolLM2 model" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.pd-cluster.variant=${VARIANT}

# router: HTTP (OpenAI API, /health, /live, /metrics), gRPC; prefill: gRPC, /metrics;
# decode: gRPC, /metrics; etcd: client, peer.
EXPOSE 8000 50051 50061 9161 50071 9171 2379 2380

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/pd
# Readiness through the node's own API; the role is the program the container runs.
HEALTHCHECK --interval=5s --timeout=5s --start-period=120s --retries=3 CMD ["pd-probe", "ready"]
# No ENTRYPOINT: the command names the role (pd-router, pd-prefill, pd-decode or etcd).
CMD ["pd-router"]
