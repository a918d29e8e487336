"""An SNS topic with an SQS queue subscribed to it, on the moto server, and what
reached the queue.

usage: sns_sqs.py setup ENDPOINT NAME     prints {"topic": ARN, "queue": URL}
       sns_sqs.py receive ENDPOINT URL    prints [{"body": ..., "attributes": {...}}]
                                          (and deletes what it printed)
Raw message delivery: the queue gets the published message and its attributes as sent.
"""

import json
import sys

import boto3

verb, endpoint = sys.argv[1], sys.argv[2]
kw = dict(endpoint_url=endpoint, region_name="us-east-1")
sns, sqs = boto3.client("sns", **kw), boto3.client("sqs", **kw)

if verb == "setup":
    name = sys.argv[3]
    topic = sns.create_topic(Name=name)["TopicArn"]
    queue = sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(
        TopicArn=topic,
        Protocol="sqs",
        Endpoint=arn,
        Attributes={"RawMessageDelivery": "true"},
    )
    print(json.dumps({"topic": topic, "queue": queue}))
elif verb == "receive":
    url = sys.argv[3]
    out = []
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"])
        messages = got.get("Messages", [])
        if not messages:
            break
        for m in messages:
            attrs = {k: v.get("StringValue") for k, v in m.get("MessageAttributes", {}).items()}
            out.append({"body": m["Body"], "attributes": attrs})
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    print(json.dumps(out))
else:
    sys.exit(f"unknown verb {verb}")
