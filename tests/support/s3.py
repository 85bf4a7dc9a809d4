"""A real S3-compatible HTTP server for the tests: moto's server mode on a free port of 127.0.0.1.
boto3 speaks HTTP to it exactly as to AWS or MinIO (signing, path-style requests, presigned URLs);
nothing in the client is mocked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.support.services import free_port, http_ok, wait_until

# Any key is accepted by the server; they are given as users give theirs, in the environment.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "imagegate-test",
    "AWS_SECRET_ACCESS_KEY": "imagegate-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint_url: str
    server: Any

    def client(self):
        import boto3

        return boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint_url)

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        client = self.client()
        listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listing}

    def stop(self) -> None:
        self.server.stop()


def start_s3() -> S3Server:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{endpoint}/moto-api/"), 30, "the moto S3 server")
    return S3Server(endpoint, server)
