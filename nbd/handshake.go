package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"cairn.io/cairn/blockdev"
)

// errClientAborted ends a handshake the client ended with NBD_OPT_ABORT or by hanging up between
// options; neither is a failure.
var errClientAborted = errors.New("nbd: client ended the handshake")

// errProtocol marks a handshake or request the server cannot make sense of; the connection is
// dropped.
var errProtocol = errors.New("nbd: protocol violation")

// openedExport is an export opened during the handshake and what the server told the client.
type openedExport struct {
	name string
	exp  blockdev.Device
	size uint64
}

// handshake runs the fixed newstyle negotiation. It returns the export the client chose with
// NBD_OPT_GO or NBD_OPT_EXPORT_NAME; the connection then enters transmission.
func (c *serverConn) handshake() (*openedExport, error) {
	greeting := make([]byte, 0, 18)
	greeting = binary.BigEndian.AppendUint64(greeting, magicNBD)
	greeting = binary.BigEndian.AppendUint64(greeting, magicOpts)
	greeting = binary.BigEndian.AppendUint16(greeting, flagFixedNewstyle|flagNoZeroes)
	if err := c.writeHandshake(greeting); err != nil {
		return nil, err
	}
	var flagBuf [4]byte
	if err := c.readHandshake(flagBuf[:]); err != nil {
		return nil, fmt.Errorf("read client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(flagBuf[:])
	if unknown := flags &^ clientFlagsKnown; unknown != 0 {
		return nil, fmt.Errorf("client flags %#x include unknown bits %#x: %w", flags, unknown, errProtocol)
	}
	if flags&clientFlagFixedNewstyle == 0 {
		return nil, fmt.Errorf("client does not speak fixed newstyle negotiation (flags %#x), the only one served: %w", flags, errProtocol)
	}
	c.noZeroes = flags&clientFlagNoZeroes != 0

	hdr := make([]byte, optionHdrSize)
	for range maxOptions {
		if err := c.readHandshake(hdr); err != nil {
			if errors.Is(err, io.EOF) {
				return nil, errClientAborted
			}
			return nil, fmt.Errorf("read option header: %w", err)
		}
		h, err := parseOptionHeader(hdr)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errProtocol, err)
		}
		if h.length > maxOptionLength {
			return nil, fmt.Errorf("%s with %d bytes of data, limit %d: %w", optionName(h.option), h.length, maxOptionLength, errProtocol)
		}
		data := make([]byte, h.length)
		if err := c.readHandshake(data); err != nil {
			return nil, fmt.Errorf("read %s data: %w", optionName(h.option), err)
		}
		c.log.Debug("nbd: option", "option", optionName(h.option), "length", h.length)
		opened, err := c.handleOption(h.option, data)
		if err != nil || opened != nil {
			return opened, err
		}
	}
	return nil, fmt.Errorf("more than %d options: %w", maxOptions, errProtocol)
}

// handleOption answers one option. It returns a non-nil export when the client entered
// transmission, an error when the connection must end.
func (c *serverConn) handleOption(option uint32, data []byte) (*openedExport, error) {
	if c.srv.cfg.RequireTLS && !c.tls {
		switch option {
		case optStartTLS, optAbort:
		case optExportName:
			// No error reply exists for this option: hang up.
			return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a server that requires TLS: %w", errProtocol)
		default:
			return nil, c.replyOptionError(option, repErrTLSReqd, "this server requires TLS: send NBD_OPT_STARTTLS first")
		}
	}
	switch option {
	case optStartTLS:
		return nil, c.startTLS(data)

	case optExportName:
		name := string(data)
		if err := checkExportName(name); err != nil {
			return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME: %w: %w", errProtocol, err)
		}
		opened, err := c.openExport(name)
		if err != nil {
			// This option cannot be answered with an error: the protocol requires a hard disconnect.
			return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %w", name, err)
		}
		b := binary.BigEndian.AppendUint64(nil, opened.size)
		b = binary.BigEndian.AppendUint16(b, c.transmissionFlags(opened.exp))
		if !c.noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		if err := c.writeHandshake(b); err != nil {
			_ = opened.exp.Close()
			return nil, err
		}
		return opened, nil

	case optAbort:
		// The client may hang up without reading the acknowledgement: ignore a failed write.
		_ = c.writeHandshake(appendOptionReply(nil, option, repAck, nil))
		return nil, errClientAborted

	case optList:
		if len(data) != 0 {
			return nil, c.replyOptionError(option, repErrInvalid, "NBD_OPT_LIST carries no data")
		}
		ctx, cancel := context.WithTimeout(c.srv.ctx, c.srv.cfg.HandshakeTimeout)
		names, err := c.srv.cfg.Exports.List(ctx)
		cancel()
		if err != nil {
			c.log.Warn("nbd: list exports failed", "err", err)
			return nil, c.replyOptionError(option, c.exportsErrorReply(err), fmt.Sprintf("list exports: %v", err))
		}
		var b []byte
		for _, name := range names {
			if checkExportName(name) != nil {
				c.log.Warn("nbd: export name not representable in NBD; not listed", "name", name)
				continue
			}
			entry := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
			entry = append(entry, name...)
			b = appendOptionReply(b, option, repServer, entry)
		}
		b = appendOptionReply(b, option, repAck, nil)
		return nil, c.writeHandshake(b)

	case optInfo, optGo:
		req, err := parseInfoRequest(data)
		if err != nil {
			return nil, c.replyOptionError(option, repErrInvalid, err.Error())
		}
		opened, err := c.openExport(req.name)
		if err != nil {
			return nil, c.replyOptionError(option, c.exportsErrorReply(err), err.Error())
		}
		b := c.appendInfoReplies(nil, option, req, opened)
		b = appendOptionReply(b, option, repAck, nil)
		if err := c.writeHandshake(b); err != nil || option == optInfo {
			_ = opened.exp.Close()
			return nil, err
		}
		return opened, nil

	case optStructuredReply:
		if len(data) != 0 {
			return nil, c.replyOptionError(option, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY carries no data")
		}
		c.structured = true
		return nil, c.writeHandshake(appendOptionReply(nil, option, repAck, nil))

	case optListMetaContext, optSetMetaContext:
		return nil, c.handleMetaContext(option, data)

	default:
		return nil, c.replyOptionError(option, repErrUnsup, fmt.Sprintf("%s is not supported by this server", optionName(option)))
	}
}

// startTLS answers NBD_OPT_STARTTLS: an acknowledgement, then the TLS handshake on the same
// connection; the rest of the negotiation and the transmission phase go over TLS.
func (c *serverConn) startTLS(data []byte) error {
	switch {
	case c.srv.cfg.TLS == nil:
		return c.replyOptionError(optStartTLS, repErrUnsup, "this server has no TLS configured")
	case len(data) != 0:
		return c.replyOptionError(optStartTLS, repErrInvalid, "NBD_OPT_STARTTLS carries no data")
	case c.tls:
		return c.replyOptionError(optStartTLS, repErrInvalid, "the connection already runs TLS")
	}
	if err := c.writeHandshake(appendOptionReply(nil, optStartTLS, repAck, nil)); err != nil {
		return err
	}
	if c.r.Buffered() > 0 {
		// Bytes sent after NBD_OPT_STARTTLS before the handshake would be read as plaintext.
		return fmt.Errorf("client sent data after NBD_OPT_STARTTLS before the TLS handshake: %w", errProtocol)
	}
	t := tls.Server(c.nc, c.srv.cfg.TLS)
	ctx, cancel := context.WithTimeout(c.srv.ctx, c.srv.cfg.HandshakeTimeout)
	defer cancel()
	if err := t.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.dmu.Lock()
	c.nc = t
	c.dmu.Unlock()
	c.r = bufio.NewReaderSize(t, 64<<10)
	c.tls = true
	c.log.Debug("nbd: TLS started", "version", tls.VersionName(t.ConnectionState().Version))
	return nil
}

// appendInfoReplies appends the NBD_REP_INFO replies of a successful NBD_OPT_INFO or NBD_OPT_GO.
// NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE are always sent (the first is mandatory, the second
// describes constraints stricter than the defaults); name and description when asked for.
func (c *serverConn) appendInfoReplies(b []byte, option uint32, req infoRequest, opened *openedExport) []byte {
	info := binary.BigEndian.AppendUint16(nil, infoExport)
	info = binary.BigEndian.AppendUint64(info, opened.size)
	info = binary.BigEndian.AppendUint16(info, c.transmissionFlags(opened.exp))
	b = appendOptionReply(b, option, repInfo, info)

	info = binary.BigEndian.AppendUint16(info[:0], infoBlockSize)
	info = binary.BigEndian.AppendUint32(info, MinBlockSize)
	info = binary.BigEndian.AppendUint32(info, PreferredBlockSize)
	info = binary.BigEndian.AppendUint32(info, c.srv.cfg.MaxPayload)
	b = appendOptionReply(b, option, repInfo, info)

	if req.wants(infoName) {
		info = binary.BigEndian.AppendUint16(info[:0], infoName)
		b = appendOptionReply(b, option, repInfo, append(info, opened.name...))
	}
	if req.wants(infoDescription) {
		desc := "cairn volume " + opened.name
		if d, ok := opened.exp.(Describer); ok {
			desc = d.Description()
		}
		info = binary.BigEndian.AppendUint16(info[:0], infoDescription)
		b = appendOptionReply(b, option, repInfo, append(info, truncateString(desc)...))
	}
	return b
}

// openExport resolves the default export and opens the named one.
func (c *serverConn) openExport(name string) (*openedExport, error) {
	if name == "" {
		if c.srv.cfg.DefaultExport == "" {
			return nil, fmt.Errorf("unknown export: no default export; name one: %w", blockdev.ErrNotFound)
		}
		name = c.srv.cfg.DefaultExport
	}
	ctx, cancel := context.WithTimeout(c.srv.ctx, c.srv.cfg.HandshakeTimeout)
	defer cancel()
	exp, err := c.srv.cfg.Exports.Open(ctx, name)
	if errors.Is(err, blockdev.ErrNotFound) {
		return nil, fmt.Errorf("unknown export %q: %w", name, err)
	}
	if err != nil {
		return nil, fmt.Errorf("open export %q: %w", name, err)
	}
	size := exp.Size()
	if size < 0 {
		_ = exp.Close()
		return nil, fmt.Errorf("export %q reports size %d", name, size)
	}
	if rem := size % MinBlockSize; rem != 0 {
		// A client can only address whole blocks; the tail is not exported.
		c.log.Warn("nbd: export size not a multiple of the block size; tail not exported",
			"export", name, "size", size, "block", MinBlockSize)
		size -= rem
	}
	return &openedExport{name: name, exp: exp, size: uint64(size)}, nil
}

// exportsErrorReply chooses the option error for a failed Exports call.
func (c *serverConn) exportsErrorReply(err error) uint32 {
	if c.srv.ctx.Err() != nil {
		return repErrShutdown
	}
	if errors.Is(err, blockdev.ErrNotFound) {
		return repErrUnknown // "no such export"
	}
	c.log.Warn("nbd: export unavailable", "err", err)
	if errors.Is(err, blockdev.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
		// The export may exist (a catalog that timed out cannot tell):
		// say "not now" (clients print "server shutting down" or
		// ESHUTDOWN with the message), never ENOENT.
		return repErrShutdown
	}
	// NBD_REP_ERR_UNKNOWN reads "the requested export is not available"; the message says why.
	return repErrUnknown
}

// replyOptionError sends an option error reply with a message for a human.
func (c *serverConn) replyOptionError(option, reply uint32, msg string) error {
	c.log.Debug("nbd: option refused", "option", optionName(option), "reply", fmt.Sprintf("%#x", reply), "msg", msg)
	return c.writeHandshake(appendOptionReply(nil, option, reply, []byte(truncateString(msg))))
}

// transmissionFlags are the flags sent with the export size: the commands this server serves
// on exp, and whether exp is read-only.
func (c *serverConn) transmissionFlags(exp blockdev.Device) uint16 {
	return c.srv.flagsFor(exp, c.structured)
}

// flagsFor are the transmission flags of exp on a connection with or without structured replies.
func (s *Server) flagsFor(exp blockdev.Device, structured bool) uint16 {
	f := tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes
	if blockdev.IsReadOnly(exp) {
		f |= tflagReadOnly
	}
	if structured {
		f |= tflagSendDF // every read is answered with at most one data chunk
	}
	if s.cfg.MultiConn {
		f |= tflagCanMultiConn
	}
	return f
}

// readHandshake reads exactly len(b) bytes, each read bounded by the handshake timeout.
func (c *serverConn) readHandshake(b []byte) error {
	c.setReadDeadline(time.Now().Add(c.srv.cfg.HandshakeTimeout))
	_, err := io.ReadFull(c.r, b)
	return err
}

func (c *serverConn) writeHandshake(b []byte) error {
	if err := c.nc.SetWriteDeadline(time.Now().Add(c.srv.cfg.WriteTimeout)); err != nil {
		return fmt.Errorf("set write deadline: %w", err)
	}
	if _, err := c.nc.Write(b); err != nil {
		return fmt.Errorf("write handshake reply: %w", err)
	}
	return nil
}
