"""FAISS indexes, the guarded retriever, query encoding and the retrieval gallery."""
