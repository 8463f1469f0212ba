package nbd

import "errors"

// Describer may be implemented by the blockdev.Device a Catalog opens to give the human-readable
// description that clients receive with NBD_INFO_DESCRIPTION (nbdinfo prints it). Devices that do
// not implement it are described as "cairn volume <name>".
type Describer interface {
	Description() string
}

// ErrServerClosed is returned by Serve and ListenAndServe after Close.
var ErrServerClosed = errors.New("nbd: server closed")
