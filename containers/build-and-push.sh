#!/usr/bin/env bash
# Build a trnft image and push it to ECR; print the image URI to put in cluster.image.
#
#   containers/build-and-push.sh {neuron|neuron-native|gpu} --region REGION [--repository NAME] [--tag EXTRA_TAG]
#                                [--account ID] [--platform linux/amd64] [--allow-dirty] [--dry-run]
#
# Steps: ensure the ECR repository exists (created with scan on push if missing), docker login with an
# ECR token, build from containers/Dockerfile.<kind> with the repository root as context, tag with the
# git SHA (plus --tag), push, print the digest to put in cluster.image. A tree with uncommitted changes
# is refused (the image would not be the commit its tag names) unless --allow-dirty (tag SHA-dirty).
# --account ID: the AWS account that must receive the image; stops if the credentials are another's.
# --dry-run prints every step without doing it (no AWS or docker calls).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
python="${PYTHON:-python3}"

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "build-and-push: $*" >&2; exit 1; }

kind="${1:-}"
case "$kind" in
    neuron|neuron-native|gpu) shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "first argument must be neuron, neuron-native or gpu, got '${kind}'" ;;
esac

region="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
repository="trnft-${kind}"
extra_tag=""
account=""
platform="linux/amd64"
dry_run=0
allow_dirty=0
while [ $# -gt 0 ]; do
    case "$1" in
        --region) region="${2:?--region needs a value}"; shift 2 ;;
        --repository) repository="${2:?--repository needs a value}"; shift 2 ;;
        --tag) extra_tag="${2:?--tag needs a value}"; shift 2 ;;
        --account) account="${2:?--account needs a value}"; shift 2 ;;
        --platform) platform="${2:?--platform needs a value}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --allow-dirty) allow_dirty=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ -n "$region" ] || die "no region: pass --region or set AWS_REGION"
[[ "$repository" =~ ^[a-z0-9]+([._/-][a-z0-9]+)*$ ]] || die "--repository '$repository' is not a valid ECR name"

sha="$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null)" || die "not a git checkout: the image tag is the git SHA"
dirty="$(git -C "$root" status --porcelain 2>/dev/null | head -3 | sed 's/^...//' | paste -sd, -)"
if [ -n "$dirty" ]; then
    [ "$allow_dirty" = 1 ] || die "uncommitted changes ($dirty); commit them, or pass --allow-dirty for an image tagged ${sha}-dirty"
    sha="${sha}-dirty"  # say so rather than pretend the image is that commit
fi
[ -z "$account" ] || [[ "$account" =~ ^[0-9]{12}$ ]] || die "--account '$account' is not a 12-digit AWS account ID"

step() { echo "==> $*"; }
run() {
    if [ "$dry_run" = 1 ]; then echo "DRY-RUN: $*"; else "$@"; fi
}

if [ "$dry_run" = 1 ]; then
    account="${account:-<account>}"
    uri="${account}.dkr.ecr.${region}.amazonaws.com/${repository}"
    step "ensure ECR repository ${repository} in ${region} (create with scan on push if missing)"
    echo "DRY-RUN: $python $here/ecr.py ensure-repository --region $region --name $repository"
else
    # With --account, the credentials must belong to it (ecr.py stops with one line otherwise).
    account="$("$python" "$here/ecr.py" account ${account:+--expect "$account"})" || die "wrong or missing AWS credentials (see above)"
    step "ensure ECR repository ${repository} in ${region}"
    uri="$("$python" "$here/ecr.py" ensure-repository --region "$region" --name "$repository")" || die "cannot ensure the repository"
fi
registry="${uri%%/*}"

step "docker login ${registry}"
if [ "$dry_run" = 1 ]; then
    echo "DRY-RUN: $python $here/ecr.py login-password --region $region | docker login --username AWS --password-stdin $registry"
else
    "$python" "$here/ecr.py" login-password --region "$region" | docker login --username AWS --password-stdin "$registry"
fi

step "docker build ${uri}:${sha}"
run docker build --platform "$platform" -f "$here/Dockerfile.${kind}" -t "${uri}:${sha}" "$root"
tags=("$sha")
if [ -n "$extra_tag" ]; then
    step "docker tag ${uri}:${extra_tag}"
    run docker tag "${uri}:${sha}" "${uri}:${extra_tag}"
    tags+=("$extra_tag")
fi
for tag in "${tags[@]}"; do
    step "docker push ${uri}:${tag}"
    run docker push "${uri}:${tag}"
done

if [ "$dry_run" = 1 ]; then
    digest="${uri}@sha256:<digest after push>"
else
    digest="$(docker inspect --format '{{index .RepoDigests 0}}' "${uri}:${sha}")"
fi
echo "image: ${uri}:${sha}"
echo "digest: ${digest}"
echo "set cluster.image: ${digest}"
echo "(the digest is immutable; a tag can be moved to another image between two stages of a run)"
