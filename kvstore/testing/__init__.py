"""Tools for testing code that uses kvstore: an HTTP fault-injecting proxy for S3 endpoints."""
