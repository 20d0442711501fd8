"""Mints RDS IAM auth tokens with botocore at fixed times: an independent signer for
rds-iam's cross-check. Reads one JSON case per line on stdin, writes one token per line.

A case: {"host", "port", "user", "region", "access_key", "secret_key", "session_token"
(or null), "time" (Unix seconds)}.
"""
import datetime
import json
import sys
from unittest import mock

import botocore.credentials
import botocore.session


def main():
    session = botocore.session.get_session()
    session.set_credentials("placeholder", "placeholder")
    clients = {}
    for line in sys.stdin:
        case = json.loads(line)
        client = clients.get(case["region"])
        if client is None:
            client = clients[case["region"]] = session.create_client("rds", region_name=case["region"])
        # One client per region; each case brings its own credentials.
        client._request_signer._credentials = botocore.credentials.Credentials(
            case["access_key"], case["secret_key"], case["session_token"]
        )
        when = datetime.datetime.fromtimestamp(case["time"], tz=datetime.timezone.utc)
        with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
            token = client.generate_db_auth_token(
                DBHostname=case["host"], Port=case["port"], DBUsername=case["user"], Region=case["region"]
            )
        print(token)


if __name__ == "__main__":
    main()
