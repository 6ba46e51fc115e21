"""ImageBind vision and text towers, the content-hash vector cache, embedding and its Dask runner."""
