package nbd

import (
	"context"
	"encoding/binary"
	"fmt"

	"cairn.io/cairn/blockdev"
)

// Block status: the base:allocation metadata context (holes and zeros) and
// NBD_CMD_BLOCK_STATUS, so that nbdinfo --map, nbdcopy and qemu-img convert
// skip what a volume never stored.

const (
	repMetaContext uint32 = 4 // NBD_REP_META_CONTEXT

	replyTypeBlockStatus uint16 = 5 // NBD_REPLY_TYPE_BLOCK_STATUS

	// The one metadata context this server offers, and its id.
	contextAllocation   = "base:allocation"
	contextAllocationID = uint32(1)

	stateHole uint32 = 1 << 0 // NBD_STATE_HOLE
	stateZero uint32 = 1 << 1 // NBD_STATE_ZERO

	// maxDescriptor bounds one descriptor's length (it is 32 bits on the
	// wire), maxDescriptors the descriptors of one reply.
	maxDescriptor  = 1 << 30
	maxDescriptors = 1024
)

// metaContextRequest is the data of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT: an export name and queries.
type metaContextRequest struct {
	export  string
	queries []string
}

func parseMetaContextRequest(data []byte) (metaContextRequest, error) {
	var r metaContextRequest
	str := func(what string) (string, error) {
		if len(data) < 4 {
			return "", fmt.Errorf("%s: %d bytes left, need 4 for a length: %w", what, len(data), errMalformedOption)
		}
		n := uint64(binary.BigEndian.Uint32(data))
		if n > maxStringLen || n > uint64(len(data)-4) {
			return "", fmt.Errorf("%s of %d bytes in %d bytes of option data: %w", what, n, len(data)-4, errMalformedOption)
		}
		s := string(data[4 : 4+n])
		data = data[4+n:]
		return s, nil
	}
	var err error
	if r.export, err = str("export name"); err != nil {
		return r, err
	}
	if err := checkExportName(r.export); err != nil {
		return r, err
	}
	if len(data) < 4 {
		return r, fmt.Errorf("no query count: %w", errMalformedOption)
	}
	n := binary.BigEndian.Uint32(data)
	data = data[4:]
	if uint64(n) > uint64(len(data))/4 {
		return r, fmt.Errorf("%d queries in %d bytes: %w", n, len(data), errMalformedOption)
	}
	for range n {
		q, err := str("query")
		if err != nil {
			return r, err
		}
		if err := checkExportName(q); err != nil { // the same rules for every string
			return r, err
		}
		r.queries = append(r.queries, q)
	}
	if len(data) != 0 {
		return r, fmt.Errorf("%d bytes after the last query: %w", len(data), errMalformedOption)
	}
	return r, nil
}

// matchesAllocation tells whether a query selects base:allocation: the
// context itself or its namespace ("base:", listing only).
func matchesAllocation(q string, listing bool) bool {
	return q == contextAllocation || (listing && q == "base:")
}

// handleMetaContext answers NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT. Setting needs structured replies and remembers
// the export it was for: NBD_OPT_GO on another export clears it.
func (c *serverConn) handleMetaContext(option uint32, data []byte) error {
	if option == optSetMetaContext && !c.structured {
		return c.replyOptionError(option, repErrInvalid, "NBD_OPT_SET_META_CONTEXT before NBD_OPT_STRUCTURED_REPLY")
	}
	req, err := parseMetaContextRequest(data)
	if err != nil {
		return c.replyOptionError(option, repErrInvalid, err.Error())
	}
	listing := option == optListMetaContext
	selected := listing && len(req.queries) == 0 // listing with no query lists everything
	for _, q := range req.queries {
		if matchesAllocation(q, listing) {
			selected = true
		}
	}
	if !listing {
		c.metaExport, c.allocation = req.export, selected
	}
	var b []byte
	if selected {
		p := binary.BigEndian.AppendUint32(nil, contextAllocationID)
		p = append(p, contextAllocation...)
		b = appendOptionReply(b, option, repMetaContext, p)
	}
	b = appendOptionReply(b, option, repAck, nil)
	return c.writeHandshake(b)
}

// blockStatus answers NBD_CMD_BLOCK_STATUS for [off, off+length): the
// device's map when it has one (blockdev.Mapper), else one data extent.
func (c *serverConn) blockStatus(ctx context.Context, exp blockdev.Device, off, length int64, one bool) ([]blockdev.Extent, error) {
	m, ok := exp.(blockdev.Mapper)
	if !ok {
		return []blockdev.Extent{{Length: length}}, nil
	}
	ext, err := m.Map(ctx, off, length)
	if err != nil {
		return nil, fmt.Errorf("block status: %w", err)
	}
	var total int64
	for i, e := range ext {
		if e.Length <= 0 || total+e.Length > length {
			return nil, fmt.Errorf("block status: the device mapped extent %d of %d bytes at %d for a %d-byte request", i, e.Length, off+total, length)
		}
		total += e.Length
	}
	if len(ext) == 0 {
		return nil, fmt.Errorf("block status: the device mapped nothing at %d", off)
	}
	if one {
		ext = ext[:1]
	}
	return ext, nil
}

// sendBlockStatus sends the final NBD_REPLY_TYPE_BLOCK_STATUS chunk of a
// request: extents longer than a descriptor are split, and no more than
// maxDescriptors are sent (the client asks again for the rest).
func (c *serverConn) sendBlockStatus(req request, ext []blockdev.Extent) error {
	p := binary.BigEndian.AppendUint32(nil, contextAllocationID)
	n := 0
	for _, e := range ext {
		flags := uint32(0)
		if e.Hole {
			flags = stateHole | stateZero
		}
		for left := e.Length; left > 0 && n < maxDescriptors; n++ {
			d := min(left, maxDescriptor)
			p = binary.BigEndian.AppendUint32(p, uint32(d))
			p = binary.BigEndian.AppendUint32(p, flags)
			left -= d
		}
	}
	hdr := appendChunkHeader(nil, replyFlagDone, replyTypeBlockStatus, req.cookie, uint32(len(p)))
	return c.send(hdr, p)
}
