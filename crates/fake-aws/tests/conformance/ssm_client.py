"""An SSM port-forwarding client written only from shared/ssm-protocol.md, independent of
the project's Rust code: botocore signs the control plane, `websockets` carries the data
channel, and the binary message codec below follows the spec's table (checked first against
the spec's test vector). It drives fake-aws through the seed recipe's shape and checks what
AWS's own tools rely on: StartSession with localPortNumber, the handshake's Properties,
acknowledgements, HandshakeComplete, TerminateSession and channel_closed.

Environment: AWS_ENDPOINT_URL_SSM, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN (optional), SSM_TARGET. Exit 0 when every check passed, 1 otherwise.

It also speaks the session-manager-plugin's command line, so that AWS's own CLI can run it
in the plugin's place (`aws ssm start-session` calls StartSession itself, then runs
`session-manager-plugin --version` and `session-manager-plugin <response or the name of the
variable holding it> <region> StartSession <profile> <request JSON> <endpoint>`): then the
CLI's StartSession request and response are checked, and the data channel as above.
"""

import datetime
import hashlib
import json
import os
import struct
import sys
import time
import uuid

import botocore.session
from websockets.sync.client import connect

HEADER_LENGTH = 116
CHECKS = []


def check(condition, what):
    CHECKS.append(what)
    if not condition:
        print(f"conformance: FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def encode(message_type, sequence, flags, payload_type, payload, message_id=None):
    message_id = message_id or uuid.uuid4()
    raw = message_id.bytes
    header = (
        struct.pack(">I", HEADER_LENGTH)
        + message_type.encode().ljust(32, b" ")
        + struct.pack(">IQqQ", 1, int(time.time() * 1000), sequence, flags)
        + raw[8:16]
        + raw[0:8]  # halves swapped on the wire
        + hashlib.sha256(payload).digest()
        + struct.pack(">II", payload_type, len(payload))
    )
    return header + payload


def decode(frame):
    (header_length,) = struct.unpack(">I", frame[0:4])
    message_type = frame[4:36].rstrip(b" \x00").decode()
    schema, created, sequence, flags = struct.unpack(">IQqQ", frame[36:64])
    message_id = uuid.UUID(bytes=frame[72:80] + frame[64:72])
    digest = frame[80:112]
    payload_type, payload_length = struct.unpack(">II", frame[112:120])
    payload = frame[header_length + 4 :]
    return {
        "header_length": header_length,
        "type": message_type,
        "schema": schema,
        "created": created,
        "sequence": sequence,
        "flags": flags,
        "id": message_id,
        "digest_ok": payload_length == 0 or hashlib.sha256(payload).digest() == digest,
        "payload_type": payload_type,
        "payload_length": payload_length,
        "payload": payload,
    }


def self_test():
    # §3's test vector, produced by the official implementation.
    vector = bytes.fromhex(
        "00000074696e7075745f73747265616d5f64617461202020202020202020202020202020"
        "000000010000015e0baa788400000000000000050000000000000000a508b5f073f31b16"
        "dd01e56bff48483e433ebf5bc03dffa38536673207a21281612cef5faa9bc7a4d5b9be2f"
        "db12cf1a0000000a0000000400000002"
    )
    message = decode(vector)
    check(message["type"] == "input_stream_data", "test vector: MessageType")
    check(message["created"] == 1503434274948 and message["sequence"] == 5, "test vector: fields")
    check(str(message["id"]) == "dd01e56b-ff48-483e-a508-b5f073f31b16", "test vector: MessageId")
    check(message["digest_ok"] and message["payload"] == b"\x00\x00\x00\x02", "test vector: payload")
    again = encode("input_stream_data", 5, 0, 10, b"\x00\x00\x00\x02", message["id"])
    check(again[:40] == vector[:40] and again[48:] == vector[48:], "test vector: encoding")


def ack(ws, message):
    body = json.dumps(
        {
            "AcknowledgedMessageType": message["type"],
            "AcknowledgedMessageId": str(message["id"]),
            "AcknowledgedMessageSequenceNumber": message["sequence"],
            "IsSequentialMessage": True,
        }
    ).encode()
    ws.send(encode("acknowledge", 0, 3, 0, body))


def receive(ws, acked, want):
    """Messages until `want` matches one; stream data is acked, acks are recorded."""
    while True:
        frame = ws.recv(timeout=20)
        if isinstance(frame, str):
            continue
        message = decode(frame)
        check(message["header_length"] == HEADER_LENGTH, "HeaderLength is 116")
        check(message["created"] != 0, "CreatedDate is not 0")
        check(message["digest_ok"], f"the payload digest of {message['type']} matches")
        if message["type"] == "output_stream_data":
            ack(ws, message)
        if message["type"] == "acknowledge":
            body = json.loads(message["payload"])
            acked.add(body["AcknowledgedMessageSequenceNumber"])
        if want(message):
            return message


PLUGIN_VERSION = "1.2.677.0"
RECIPE_PARAMETERS = {"host": ["db.example"], "portNumber": ["5432"], "localPortNumber": ["1053"]}


def ssm_client(region, endpoint):
    return botocore.session.get_session().create_client(
        "ssm",
        region_name=region,
        endpoint_url=endpoint,
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN"),
    )


def main():
    self_test()
    ssm = ssm_client(os.environ["AWS_REGION"], os.environ["AWS_ENDPOINT_URL_SSM"])
    # The seed recipe's call.
    started = ssm.start_session(
        Target=os.environ["SSM_TARGET"],
        DocumentName="AWS-StartPortForwardingSessionToRemoteHost",
        Parameters=RECIPE_PARAMETERS,
        Reason="conformance",
    )
    data_channel(ssm, started, RECIPE_PARAMETERS)


def as_plugin(argv):
    """Run by `aws ssm start-session` in session-manager-plugin's place."""
    self_test()
    given, region, operation, _profile, request, endpoint = argv[:6]
    check(operation == "StartSession", "the CLI runs the plugin for StartSession")
    started = json.loads(os.environ[given] if given in os.environ else given)
    request = json.loads(request)
    check(request.get("Target") == os.environ["SSM_TARGET"], "the CLI passes the request's Target")
    check(
        request.get("DocumentName") == "AWS-StartPortForwardingSessionToRemoteHost",
        "the CLI passes the request's DocumentName",
    )
    parameters = request.get("Parameters", {})
    check(parameters.get("localPortNumber") == ["1053"], "the CLI passes localPortNumber 1053")
    check(endpoint == os.environ["AWS_ENDPOINT_URL_SSM"], "the CLI passes fake-aws's endpoint")
    data_channel(ssm_client(region, endpoint), started, parameters)


def data_channel(ssm, started, parameters):
    """The data channel of a started session, then TerminateSession and channel_closed."""
    for key in ("SessionId", "TokenValue", "StreamUrl"):
        check(started.get(key), f"StartSession returns {key}")
    check("/v1/data-channel/" + started["SessionId"] in started["StreamUrl"], "StreamUrl names the session")

    acked = set()
    with connect(started["StreamUrl"]) as ws:
        ws.send(
            json.dumps(
                {
                    "MessageSchemaVersion": "1.0",
                    "RequestId": str(uuid.uuid4()),
                    "TokenValue": started["TokenValue"],
                    "ClientId": str(uuid.uuid4()),
                    "ClientVersion": PLUGIN_VERSION,
                }
            )
        )
        request = receive(ws, acked, lambda m: m["type"] == "output_stream_data")
        check(request["sequence"] == 0 and request["payload_type"] == 5, "HandshakeRequest is seq 0, PayloadType 5")
        check(request["flags"] & 1 == 1, "the agent sets SYN on its seq 0")
        body = json.loads(request["payload"])
        check(isinstance(body.get("AgentVersion"), str), "HandshakeRequest has AgentVersion")
        action = body["RequestedClientActions"][0]
        check(action["ActionType"] == "SessionType", "the action is SessionType")
        check(action["ActionParameters"]["SessionType"] == "Port", "SessionType is Port")
        properties = action["ActionParameters"]["Properties"]
        for name, values in parameters.items():
            check(properties.get(name) == values[0], f"Properties carry {name} as a string ({values[0]})")
        check(properties.get("type") == "LocalPortForwarding", "Properties carry the forwarding type")

        response = json.dumps(
            {
                "ClientVersion": PLUGIN_VERSION,
                "ProcessedClientActions": [
                    {"ActionType": "SessionType", "ActionStatus": 1, "ActionResult": None, "Error": ""}
                ],
                "Errors": None,
            }
        ).encode()
        ws.send(encode("input_stream_data", 0, 0, 6, response))
        complete = receive(ws, acked, lambda m: m["type"] == "output_stream_data")
        check(complete["sequence"] == 1 and complete["payload_type"] == 7, "HandshakeComplete is seq 1, PayloadType 7")
        body = json.loads(complete["payload"])
        check(isinstance(body.get("HandshakeTimeToComplete"), int), "HandshakeComplete has HandshakeTimeToComplete")
        check("CustomerMessage" in body, "HandshakeComplete has CustomerMessage")
        deadline = time.time() + 10
        while 0 not in acked and time.time() < deadline:
            receive(ws, acked, lambda m: m["type"] == "acknowledge")
        check(0 in acked, "the agent acknowledges the HandshakeResponse (seq 0)")

        ssm.terminate_session(SessionId=started["SessionId"])
        closed = receive(ws, acked, lambda m: m["type"] == "channel_closed")
        check(closed["payload_type"] == 0, "channel_closed has PayloadType 0")
        body = json.loads(closed["payload"])
        check(body.get("SessionId") == started["SessionId"], "channel_closed names the session")
        check(body.get("Output") == "", "channel_closed's Output is empty")
        check(isinstance(body.get("SchemaVersion"), int), "channel_closed's SchemaVersion is a number")
        created = body.get("CreatedDate", "")
        try:
            parsed = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%S.%fZ")
        except ValueError:
            parsed = None
        check(parsed is not None and len(created) == 24, f"channel_closed's CreatedDate is ISO-8601 ({created})")
        # The service leaves the websocket for the client to close: it still answers a ping.
        check(ws.ping(b"still there?").wait(timeout=5), "the websocket stays open after channel_closed")
    print(f"conformance: {len(CHECKS)} checks passed")


if __name__ == "__main__":
    if sys.argv[1:] == ["--version"]:
        print(PLUGIN_VERSION)
    elif len(sys.argv) >= 7:
        as_plugin(sys.argv[1:])
    else:
        main()
