package kubernetes

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

const (
	driverName = "csi.cairn.io"
	cairnImage = "cairn/cairn-csi" // built here, so tagged latest
	kubeletDir = "/var/lib/kubelet"
)

// cairnFlags are the flags of cairn-csi, each with the values it takes (nil:
// any value).
var cairnFlags = map[string][]string{
	"endpoint": nil, "mds": nil, "node-id": nil, "state-dir": nil, "log-level": nil,
	"tls-cert": nil, "tls-key": nil, "tls-ca": nil,
	"mode":                 {"all", "controller", "node"},
	"attach":               {"fuse", "nbd", "iscsi", "auto"},
	"reattach-timeout":     nil,
	"nbd-reattach-timeout": nil,
	"iscsiadm":             nil,
}

// kinds gives the typed object of every apiVersion/kind the manifests use.
var kinds = map[string]func() any{
	"v1/Namespace":             func() any { return new(corev1.Namespace) },
	"v1/ServiceAccount":        func() any { return new(corev1.ServiceAccount) },
	"v1/ConfigMap":             func() any { return new(corev1.ConfigMap) },
	"v1/PersistentVolumeClaim": func() any { return new(corev1.PersistentVolumeClaim) },
	"v1/Pod":                   func() any { return new(corev1.Pod) },
	"apps/v1/Deployment":       func() any { return new(appsv1.Deployment) },
	"apps/v1/DaemonSet":        func() any { return new(appsv1.DaemonSet) },
	"rbac.authorization.k8s.io/v1/ClusterRole":        func() any { return new(rbacv1.ClusterRole) },
	"rbac.authorization.k8s.io/v1/ClusterRoleBinding": func() any { return new(rbacv1.ClusterRoleBinding) },
	"rbac.authorization.k8s.io/v1/Role":               func() any { return new(rbacv1.Role) },
	"rbac.authorization.k8s.io/v1/RoleBinding":        func() any { return new(rbacv1.RoleBinding) },
	"storage.k8s.io/v1/CSIDriver":                     func() any { return new(storagev1.CSIDriver) },
	"storage.k8s.io/v1/StorageClass":                  func() any { return new(storagev1.StorageClass) },
	"snapshot.storage.k8s.io/v1/VolumeSnapshotClass":  func() any { return new(volumeSnapshotClass) },
	"snapshot.storage.k8s.io/v1/VolumeSnapshot":       func() any { return new(volumeSnapshot) },
}

// volumeSnapshotClass is external-snapshotter's VolumeSnapshotClass (a CRD
// kind: the module that defines it is not a dependency of Cairn), the
// fields a class may set.
type volumeSnapshotClass struct {
	APIVersion     string            `json:"apiVersion"`
	Kind           string            `json:"kind"`
	Metadata       metav1.ObjectMeta `json:"metadata"`
	Driver         string            `json:"driver"`
	DeletionPolicy string            `json:"deletionPolicy"`
	Parameters     map[string]string `json:"parameters,omitempty"`
}

// volumeSnapshot is external-snapshotter's VolumeSnapshot, the fields an
// example sets.
type volumeSnapshot struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		VolumeSnapshotClassName string `json:"volumeSnapshotClassName"`
		Source                  struct {
			PersistentVolumeClaimName string `json:"persistentVolumeClaimName"`
		} `json:"source"`
	} `json:"spec"`
}

// kustomization is the part of kustomize's Kustomization that
// kustomization.yaml may use.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
}

// object is one decoded manifest document.
type object struct {
	where string // file#index
	obj   any
}

// separator is a line that separates YAML documents.
var separator = regexp.MustCompile(`(?m)^---[ \t]*$`)

// strictDecode converts one YAML document to JSON and decodes it into obj,
// failing on fields obj does not have, on trailing data, and on fields
// spelled in another case (which encoding/json would accept).
func strictDecode(doc []byte, obj any) error {
	js, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(obj); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("data after the object")
	}
	// Every key of the document must come back, spelled the same, when the
	// object is encoded again (zero values may be left out).
	back, err := json.Marshal(obj)
	if err != nil {
		return err
	}
	var orig, round any
	if err := json.Unmarshal(js, &orig); err != nil {
		return err
	}
	if err := json.Unmarshal(back, &round); err != nil {
		return err
	}
	return sameKeys(orig, round, "")
}

// sameKeys reports the first non-zero key of orig missing from round.
func sameKeys(orig, round any, path string) error {
	switch o := orig.(type) {
	case map[string]any:
		r, _ := round.(map[string]any)
		for k, v := range o {
			rv, ok := r[k]
			if !ok && !isZero(v) {
				return fmt.Errorf("field %s.%s: not a field of the type (spelling or case)", path, k)
			}
			if err := sameKeys(v, rv, path+"."+k); err != nil {
				return err
			}
		}
	case []any:
		r, _ := round.([]any)
		for i, v := range o {
			if i < len(r) {
				if err := sameKeys(v, r[i], fmt.Sprintf("%s[%d]", path, i)); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func isZero(v any) bool {
	switch v := v.(type) {
	case nil:
		return true
	case bool:
		return !v
	case float64:
		return v == 0
	case string:
		return v == ""
	case []any:
		return len(v) == 0
	case map[string]any:
		return len(v) == 0
	}
	return false
}

// loadAll decodes every document of every *.yaml under this directory.
func loadAll(t *testing.T) (objs []object, kust *kustomization) {
	t.Helper()
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || filepath.Ext(path) != ".yaml" {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if path == "kustomization.yaml" {
			kust = new(kustomization)
			if err := strictDecode(data, kust); err != nil {
				t.Errorf("%s: %v", path, err)
			}
			return nil
		}
		for i, doc := range separator.Split(string(data), -1) {
			where := fmt.Sprintf("%s#%d", path, i)
			var head struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
			}
			if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
				t.Errorf("%s: %v", where, err)
				continue
			}
			if head.APIVersion == "" && head.Kind == "" && strings.TrimSpace(stripComments(doc)) == "" {
				continue // comments only
			}
			newObj, ok := kinds[head.APIVersion+"/"+head.Kind]
			if !ok {
				t.Errorf("%s: unknown kind %q of apiVersion %q", where, head.Kind, head.APIVersion)
				continue
			}
			obj := newObj()
			if err := strictDecode([]byte(doc), obj); err != nil {
				t.Errorf("%s (%s): %v", where, head.Kind, err)
				continue
			}
			objs = append(objs, object{where, obj})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if kust == nil {
		t.Fatal("no kustomization.yaml")
	}
	return objs, kust
}

func stripComments(doc string) string {
	var b strings.Builder
	for line := range strings.Lines(doc) {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line)
		}
	}
	return b.String()
}

func TestManifests(t *testing.T) {
	objs, kust := loadAll(t)

	// kustomization.yaml lists every top-level manifest, and only those.
	if kust.APIVersion != "kustomize.config.k8s.io/v1beta1" || kust.Kind != "Kustomization" {
		t.Errorf("kustomization.yaml: apiVersion %q kind %q", kust.APIVersion, kust.Kind)
	}
	top, _ := filepath.Glob("*.yaml")
	for _, r := range kust.Resources {
		if _, err := os.Stat(r); err != nil {
			t.Errorf("kustomization.yaml: resource %s: %v", r, err)
		}
	}
	for _, f := range top {
		if f != "kustomization.yaml" && !slices.Contains(kust.Resources, f) {
			t.Errorf("%s is not in kustomization.yaml's resources", f)
		}
	}

	var drivers []string
	var provisioners []string
	var snapshotDrivers []string
	daemonSets := 0
	for _, o := range objs {
		switch v := o.obj.(type) {
		case *storagev1.CSIDriver:
			drivers = append(drivers, v.Name)
		case *storagev1.StorageClass:
			provisioners = append(provisioners, v.Provisioner)
		case *volumeSnapshotClass:
			snapshotDrivers = append(snapshotDrivers, v.Driver)
			if v.DeletionPolicy != "Delete" && v.DeletionPolicy != "Retain" {
				t.Errorf("%s: deletionPolicy %q", o.where, v.DeletionPolicy)
			}
		case *corev1.Pod:
			checkPod(t, o.where, &v.Spec)
		case *appsv1.Deployment:
			checkPod(t, o.where, &v.Spec.Template.Spec)
		case *appsv1.DaemonSet:
			daemonSets++
			checkPod(t, o.where, &v.Spec.Template.Spec)
			checkKubeletMount(t, o.where, &v.Spec.Template.Spec)
			// iscsiadm in the container writes the host's node records
			// for the host's iscsid, under the host's lock.
			for _, dir := range []string{"/etc/iscsi", "/run/lock/iscsi"} {
				checkHostMount(t, o.where, &v.Spec.Template.Spec, dir)
			}
		}
	}
	if !slices.Equal(drivers, []string{driverName}) {
		t.Errorf("CSIDrivers %q, want one, %s", drivers, driverName)
	}
	if len(provisioners) == 0 {
		t.Error("no StorageClass")
	}
	for _, p := range provisioners {
		if p != driverName {
			t.Errorf("StorageClass provisioner %q, want the CSIDriver's name %s", p, driverName)
		}
	}
	if !slices.Equal(snapshotDrivers, []string{driverName}) {
		t.Errorf("VolumeSnapshotClass drivers %q, want one, %s", snapshotDrivers, driverName)
	}
	if daemonSets != 1 {
		t.Errorf("%d DaemonSets, want 1 (the node plugin)", daemonSets)
	}
}

// checkPod checks the images of a pod's containers, and the args of its
// cairn-csi containers.
func checkPod(t *testing.T, where string, spec *corev1.PodSpec) {
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		repo, tag := splitImage(c.Image)
		if repo == cairnImage {
			if len(c.Command) > 0 {
				t.Errorf("%s: container %s overrides cairn-csi's entrypoint", where, c.Name)
			}
			if err := checkArgs(c.Args); err != nil {
				t.Errorf("%s: container %s: %v", where, c.Name, err)
			}
			continue
		}
		if tag == "" || tag == "latest" {
			t.Errorf("%s: container %s: image %q has no explicit tag", where, c.Name, c.Image)
		}
	}
}

// splitImage splits an image reference into repository and tag (or digest).
func splitImage(image string) (repo, tag string) {
	if i := strings.Index(image, "@"); i >= 0 {
		return image[:i], image[i+1:]
	}
	slash := strings.LastIndex(image, "/")
	if i := strings.LastIndex(image, ":"); i > slash {
		return image[:i], image[i+1:]
	}
	return image, ""
}

// checkArgs checks that args use only cairn-csi's flags, with allowed values.
func checkArgs(args []string) error {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			return fmt.Errorf("argument %q is not a flag", a)
		}
		name, value, ok := strings.Cut(strings.TrimLeft(a, "-"), "=")
		allowed, known := cairnFlags[name]
		if !known {
			return fmt.Errorf("unknown flag %q", a)
		}
		if !ok { // every flag takes a value: --flag value
			if i+1 >= len(args) {
				return fmt.Errorf("flag %q without a value", a)
			}
			i++
			value = args[i]
		}
		if allowed != nil && !slices.Contains(allowed, value) {
			return fmt.Errorf("flag %q: value %q is not one of %q", name, value, allowed)
		}
	}
	// cairn-csi refuses to start without TLS unless told --insecure: the
	// manifests give it certificates.
	for _, f := range []string{"tls-cert", "tls-key", "tls-ca"} {
		if !slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(strings.TrimLeft(a, "-"), f) }) {
			return fmt.Errorf("no --%s: cairn-csi would refuse to start", f)
		}
	}
	return nil
}

// checkKubeletMount checks that the node plugin mounts the kubelet's
// directory with Bidirectional propagation, so its mounts reach the kubelet.
func checkKubeletMount(t *testing.T, where string, spec *corev1.PodSpec) {
	vol := ""
	for _, v := range spec.Volumes {
		if v.HostPath != nil && strings.TrimSuffix(v.HostPath.Path, "/") == kubeletDir {
			vol = v.Name
		}
	}
	if vol == "" {
		t.Errorf("%s: no hostPath volume of %s", where, kubeletDir)
		return
	}
	found := false
	for _, c := range spec.Containers {
		if repo, _ := splitImage(c.Image); repo != cairnImage {
			continue
		}
		for _, m := range c.VolumeMounts {
			if m.Name != vol {
				continue
			}
			found = true
			if m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
				t.Errorf("%s: container %s mounts %s without Bidirectional propagation", where, c.Name, kubeletDir)
			}
		}
	}
	if !found {
		t.Errorf("%s: no cairn-csi container mounts %s", where, kubeletDir)
	}
}

// TestStrictDecodeFails shows that the decoding refuses what kubectl would.
func TestStrictDecodeFails(t *testing.T) {
	bad := map[string]string{
		"misspelled field":    "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n    - name: a\n      imagee: busybox:1.37\n",
		"field of wrong case": "apiVersion: v1\nkind: Pod\nspec:\n  HostNetwork: true\n",
		"wrong type":          "apiVersion: v1\nkind: Pod\nspec:\n  hostNetwork: \"yes\"\n",
	}
	for name, doc := range bad {
		if err := strictDecode([]byte(doc), new(corev1.Pod)); err == nil {
			t.Errorf("%s: decoded without an error", name)
		}
	}
	good := "apiVersion: v1\nkind: Pod\nspec:\n  hostNetwork: false\n  containers:\n    - name: a\n      image: busybox:1.37\n"
	if err := strictDecode([]byte(good), new(corev1.Pod)); err != nil {
		t.Errorf("good pod: %v", err)
	}
	if err := checkArgs([]string{"--mode", "node", "--attach=fuse", "--log-level=info", "--tls-cert=c", "--tls-key=k", "--tls-ca=a"}); err != nil {
		t.Errorf("good args: %v", err)
	}
	for _, args := range [][]string{{"--mds"}, {"--mode=nodes"}, {"--nodeid=a"}, {"node"}, {"--attach=nbd"}, {"--mode=node"}} {
		if checkArgs(args) == nil {
			t.Errorf("args %q accepted", args)
		}
	}
}

// checkHostMount checks that the cairn-csi container mounts the host's dir
// at the same path.
func checkHostMount(t *testing.T, where string, spec *corev1.PodSpec, dir string) {
	vol := ""
	for _, v := range spec.Volumes {
		if v.HostPath != nil && v.HostPath.Path == dir {
			vol = v.Name
		}
	}
	for _, c := range spec.Containers {
		if repo, _ := splitImage(c.Image); repo != cairnImage {
			continue
		}
		for _, m := range c.VolumeMounts {
			if vol != "" && m.Name == vol && m.MountPath == dir {
				return
			}
		}
	}
	t.Errorf("%s: the cairn-csi container does not mount the host's %s at %s", where, dir, dir)
}
