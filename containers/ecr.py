"""ECR operations of build-and-push.sh (boto3): account, repository, login.

    python ecr.py account [--expect ID]
    python ecr.py ensure-repository --region us-west-2 --name trnft-neuron
    python ecr.py login-password --region us-west-2

Each prints one value on stdout. Errors print one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import base64
import sys
from typing import Any


def account_id(session: Any) -> str:
    return session.client("sts").get_caller_identity()["Account"]


def check_account(actual: str, expected: str | None) -> str | None:
    """The problem when the credentials belong to another account than ``--account`` names."""
    if expected and actual != expected:
        return (
            f"the credentials are for account {actual}, --account says {expected}; "
            "use credentials of that account (AWS_PROFILE) or drop --account"
        )
    return None


def ensure_repository(ecr: Any, name: str) -> tuple[str, bool]:
    """The repository URI, creating the repository (scan on push, encrypted) if it is missing.

    An existing repository without scan on push gets it switched on. Returns (uri, created).
    """
    try:
        repo = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    except ecr.exceptions.RepositoryNotFoundException:
        repo = ecr.create_repository(
            repositoryName=name,
            imageScanningConfiguration={"scanOnPush": True},
            imageTagMutability="MUTABLE",
            encryptionConfiguration={"encryptionType": "AES256"},
        )["repository"]
        return repo["repositoryUri"], True
    if not repo.get("imageScanningConfiguration", {}).get("scanOnPush"):
        ecr.put_image_scanning_configuration(
            repositoryName=name, imageScanningConfiguration={"scanOnPush": True}
        )
    return repo["repositoryUri"], False


def login(ecr: Any) -> tuple[str, str, str]:
    """(user, password, registry) for `docker login`, from an ECR authorization token."""
    data = ecr.get_authorization_token()["authorizationData"][0]
    user, password = base64.b64decode(data["authorizationToken"]).decode().split(":", 1)
    registry = data["proxyEndpoint"].removeprefix("https://")
    return user, password, registry


def main(argv: list[str] | None = None) -> int:
    import boto3
    import botocore.exceptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("account")
    p.add_argument("--expect", help="Fail unless the credentials belong to this account.")
    p = sub.add_parser("ensure-repository")
    p.add_argument("--region", required=True)
    p.add_argument("--name", required=True)
    p = sub.add_parser("login-password")
    p.add_argument("--region", required=True)
    args = parser.parse_args(argv)
    try:
        session = boto3.session.Session(region_name=getattr(args, "region", None))
        if args.command == "account":
            actual = account_id(session)
            if problem := check_account(actual, args.expect):
                print(f"ecr: {problem}", file=sys.stderr)
                return 1
            print(actual)
        elif args.command == "ensure-repository":
            uri, created = ensure_repository(session.client("ecr"), args.name)
            print(
                f"ecr: {'created' if created else 'found'} repository {args.name} (scan on push)",
                file=sys.stderr,
            )
            print(uri)
        else:
            print(login(session.client("ecr"))[1])
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        print(f"ecr: {args.command} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
