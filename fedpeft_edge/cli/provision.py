"""`fedpeft-edge provision --devices N | --device-ids a,b,c --out DIR [--tls]`: a run's security material;
`--revoke DEVICE --out DIR` takes one device out, `--rotate DEVICE --out DIR` renews one device's secrets,
`--upgrade --out DIR` brings a keystore of an earlier version to this one's layout (encryption keys)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--devices", type=int, help="provision device-0 .. device-(N-1)")
    who.add_argument("--device-ids", help="comma-separated device ids")
    who.add_argument("--revoke", metavar="DEVICE", help="remove DEVICE from the provisioned --out directory")
    who.add_argument("--rotate", metavar="DEVICE",
                     help="new password, signing key (and certificate) for DEVICE in the provisioned --out directory")
    who.add_argument("--upgrade", action="store_true",
                     help="add what a keystore of an earlier version lacks (X25519 encryption keys; a password "
                          "moved out of comm_args.yaml), keeping its passwords and signing keys")
    parser.add_argument("--out", required=True,
                        help="directory to create (never reused): a keystore, keep it outside run directories")
    parser.add_argument("--tls", action="store_true", help="also a CA, a broker certificate and node certificates")
    parser.add_argument("--topic-prefix", default="fedpeft", help="comm_args.topic_prefix (default fedpeft)")
    parser.add_argument("--run-id", default="+", help="restrict the ACL to one run id (default: any run)")
    parser.add_argument("--broker-host", default="127.0.0.1", help="the broker's address, for its certificate")


def run(args: argparse.Namespace) -> int:
    from fedpeft_edge.errors import ConfigError
    from fedpeft_edge.transport.provision import provision, revoke, rotate, upgrade

    if args.upgrade:
        prov, changed = upgrade(args.out)
        if not changed:
            print(f"{prov.root} is up to date; nothing changed")
            return 0
        print(f"upgraded {prov.root}:")
        for line in changed:
            print(f"  {line}")
        print("  apply: hand each device its directory again, restart the server (`fedpeft-server --resume RUN_DIR`) "
              "and the agents with the new comm_args.yaml")
        return 0
    if args.revoke or args.rotate:
        device = args.revoke or args.rotate
        prov = (revoke if args.revoke else rotate)(args.out, device)
        if args.revoke:
            print(f"revoked {device} in {prov.root}: its password, ACL entry, public key and keystore directory are "
                  "gone" + (" and its certificate is in broker/tls/crl.pem" if prov.tls else ""))
        else:
            print(f"rotated {device}'s secrets in {prov.root}: hand it {prov.node_dir(device)}")
        print("  apply: send SIGHUP to the broker (or restart it) and restart the server with "
              "`fedpeft-server --resume RUN_DIR`")
        return 0
    if args.devices is not None:
        if args.devices < 1:
            raise ConfigError(f"--devices must be at least 1, got {args.devices}")
        ids = [f"device-{i}" for i in range(args.devices)]
    else:
        ids = [d.strip() for d in args.device_ids.split(",") if d.strip()]
    prov = provision(args.out, ids, tls=args.tls, topic_prefix=args.topic_prefix, run_id=args.run_id,
                     broker_host=args.broker_host)
    print(f"provisioned {len(prov.devices)} devices in {prov.root} ({'TLS, ' if prov.tls else ''}signed messages)")
    print(f"  broker:  fedpeft-edge broker --secure {prov.root}")
    print(f"  server:  merge {prov.node_dir(0) / 'comm_args.yaml'} into the server's config")
    print(f"  devices: merge <out>/<device>/comm_args.yaml into each device's config (e.g. "
          f"{prov.node_dir(prov.devices[0]) / 'comm_args.yaml'})")
    return 0
