"""The paths the router serves as llama-server's router serves them, shared by the route
table (api.py) and the Vertex AI predict route (vertex.py), which answers each instance
with one of them."""

from __future__ import annotations

# Routes upstream proxies by the body's "model" (server.cpp, router branch).
PROXIED_POST = (
    "/props",
    "/completion",
    "/completions",
    "/v1/completions",
    "/chat/completions",
    "/v1/chat/completions",
    "/v1/chat/completions/control",
    "/responses",
    "/v1/responses",
    "/audio/transcriptions",
    "/v1/audio/transcriptions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/infill",
    "/embedding",
    "/embeddings",
    "/v1/embeddings",
    "/rerank",
    "/reranking",
    "/v1/rerank",
    "/v1/reranking",
    "/v1/systemone",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/v1/responses/input_tokens",
    "/responses/input_tokens",
    "/chat/completions/input_tokens",
    "/v1/chat/completions/input_tokens",
    "/lora-adapters",
    "/slots/{id_slot}",
)
# Routes upstream proxies by ?model= (GET /props and GET /metrics without it are the
# router's own).
PROXIED_GET = ("/slots", "/lora-adapters")

# The router's own model list and metrics, also reachable in -m/-hf mode, where /models
# and /metrics are the child's.
ROUTER_MODELS_PATH = "/llamarouter/models"
ROUTER_METRICS_PATH = "/llamarouter/metrics"

# Features llama-server answers with 403 unless started with them (server.cpp): the MCP
# CORS proxy of its web UI and the built-in agent tools.
DISABLED_FEATURES = ("/cors-proxy", "/tools")
