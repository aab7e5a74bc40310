"""Where bytes live, for the driver and the workers alike: local, S3 and hub stores, the
safetensors reader and writer, and header-only checkpoint indexes. Imports nothing above it."""
