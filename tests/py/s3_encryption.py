"""SSE on the moto server: a KMS key to encrypt with, and how each object is encrypted.

usage: s3_encryption.py key ENDPOINT                 prints {"arn": KEY_ARN}
       s3_encryption.py objects ENDPOINT BUCKET PREFIX
           prints {key: {"sse": ..., "kms_key_id": ..., "bucket_key": ..., "size": ...}}
"""

import json
import sys

import boto3

verb, endpoint = sys.argv[1], sys.argv[2]
kw = dict(endpoint_url=endpoint, region_name="us-east-1")

if verb == "key":
    key = boto3.client("kms", **kw).create_key(Description="walshore lake")
    print(json.dumps({"arn": key["KeyMetadata"]["Arn"]}))
elif verb == "objects":
    bucket, prefix = sys.argv[3], sys.argv[4]
    s3 = boto3.client("s3", **kw)
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            h = s3.head_object(Bucket=bucket, Key=o["Key"])
            out[o["Key"]] = {
                "sse": h.get("ServerSideEncryption"),
                "kms_key_id": h.get("SSEKMSKeyId"),
                "bucket_key": h.get("BucketKeyEnabled"),
                "size": o["Size"],
            }
    print(json.dumps(out))
else:
    sys.exit(f"unknown verb {verb}")
