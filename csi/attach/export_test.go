package attach

// NBDKernel is the kernel's nbd driver as the nbd attach uses it.
type NBDKernel = nbdKernel

// SetNBDKernel makes the nbd attach use the kernel open returns, until
// the returned function restores the real one.
func SetNBDKernel(open func() (NBDKernel, error)) (restore func()) {
	old := openNBDKernel
	openNBDKernel = open
	return func() { openNBDKernel = old }
}

// ISCSIInitiator is the node's kernel initiator as the iscsi attach uses
// it.
type ISCSIInitiator = iscsiInitiator

// ISCSINode is a node record of the iscsi attach.
type ISCSINode = iscsiNode

// SetISCSIInitiator makes the iscsi attach use the initiators newInit
// returns, until the returned function restores the real one.
func SetISCSIInitiator(newInit func(iscsiadm string) ISCSIInitiator) (restore func()) {
	old := newISCSIInitiator
	newISCSIInitiator = newInit
	return func() { newISCSIInitiator = old }
}

// ISCSILoginCommands and ISCSILogoutCommands are the iscsiadm command
// lines of a login and a logout; ISCSIRedacted is one as logs show it.
var (
	ISCSILoginCommands  = loginCommands
	ISCSILogoutCommands = logoutCommands
	ISCSIRedacted       = redacted
)

// ISCSIDisk finds the disk of n's session as the real initiator does, in
// a sysfs mounted at sys with device nodes in dev.
func ISCSIDisk(sys, dev string, n ISCSINode) (string, bool) {
	return openISCSI{adm: DefaultISCSIAdm, sys: sys, dev: dev}.disk(n)
}
