"""Object storage (local folder or Aliyun OSS) and the idempotent upload of the manifest's images."""
