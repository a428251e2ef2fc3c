"""Serving many ESFT adapters over one base model: weaving, the batching engine, the HTTP server."""
