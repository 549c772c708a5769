"""MQTT reason codes a broker answers with, explained in this project's terms: which setting to check.

0x87 (Not authorized) on a PUBLISH or SUBSCRIBE means the broker's ACL does not grant this user that topic:
with a provisioned broker, a run id (or device id) other than the one the device was provisioned for. On a
CONNECT it (or 0x86) means the user name or password is wrong.
"""

from __future__ import annotations

NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86
TOO_LARGE = (0x95, 0x97)  # packet too large, quota exceeded


def explain_connect_refusal(code: int | None) -> str:
    """The fix for a refused CONNECT."""
    if code in (NOT_AUTHORIZED, BAD_CREDENTIALS):
        return ("not authorized: the broker does not know this user name and password: check comm_args.username "
                "and comm_args.password / password_file (use the node's provisioned comm_args.yaml as it is, e.g. "
                "`--config run.yaml --config <node>/comm_args.yaml`)")
    return "check comm_args.username/password/TLS"


def explain_topic_refusal(code: int, action: str, topic: str, user: str | None, run_id: str) -> str:
    """The fix for a PUBLISH or SUBSCRIBE the broker refused (`action`: "publish" or "subscribe")."""
    if code == NOT_AUTHORIZED:
        return (f"not authorized (reason code {code:#x}): the broker's ACL does not let user {user or '(anonymous)'} "
                f"{action} on {topic}: the run id {run_id!r} (common_args.run_id) or the node id is not one this "
                "user was provisioned for: run with the run id and device id of its provisioning (`fedpeft-edge "
                "provision --run-id ...`), or provision this run")
    if code in TOO_LARGE:
        return (f"the broker refused a {action} on {topic} as too large (reason code {code:#x}): lower "
                "comm_args.max_message_bytes to the broker's limit")
    return f"the broker refused a {action} on {topic} with reason code {code:#x}"
