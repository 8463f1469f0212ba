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
