# The cairn-csi image (controller and node plugin). Build from the
# repository's root:
#   docker build -f deploy/docker/cairn-csi.Dockerfile -t cairn/cairn-csi .

FROM golang:1.26-bookworm AS build
WORKDIR /src
# Modules first, so a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# A static binary: nothing in it needs cgo.
ENV CGO_ENABLED=0
RUN go build -trimpath -o /cairn-csi ./cmd/cairn-csi

FROM debian:bookworm-slim
# What the node plugin runs: fusermount3 (the attach processes mount their
# FUSE file directly as root and fall back to it), losetup, mount/umount,
# blkid, mkfs.ext4/resize2fs, mkfs.xfs/xfs_growfs, and iscsiadm (open-iscsi;
# --attach iscsi: it asks the host's iscsid to log in, the container runs
# no iscsid of its own).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      fuse3 util-linux mount e2fsprogs xfsprogs open-iscsi ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /cairn-csi /usr/local/bin/cairn-csi
ENTRYPOINT ["/usr/local/bin/cairn-csi"]
