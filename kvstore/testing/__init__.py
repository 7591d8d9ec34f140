"""Test equipment for code that uses kvstore (install ``kvstore[testing]``): not needed to use kvstore.

``faultproxy`` is an HTTP proxy that injects latency and faults in front of an
S3 endpoint; ``s3servers`` starts moto or a single-node Ceph RADOS Gateway
(``rgw``) on 127.0.0.1 for tests and benchmarks. ``import kvstore`` never
imports this package.
"""
