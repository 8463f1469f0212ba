// Package kubernetes holds the Kubernetes manifests of Cairn's CSI driver,
// csi.cairn.io (apply them with kubectl apply -k deploy/kubernetes; see
// README.md), and a test that decodes every one of them strictly into its
// k8s.io/api type, so that a misspelled field, an image without a tag or a
// cairn-csi flag the binary does not have fails go test rather than kubectl.
package kubernetes
