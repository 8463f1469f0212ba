package datastore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool/fsutil"
)

// Clones. A clone's chunk (created by WriteClone, marked in its meta page)
// starts with no page of its own: a page it does not own reads from the
// clone's source (another volume's snapshot, which the client reads), and
// the store says which (ReadOwned). A write owns every page it touches. A
// page a write covers only in part must first be filled with the source's
// content: the write carries it (fill, whole pages of the source), and the
// store writes it into the pages the chunk does not own yet before the
// write's own data. A write that touches a page it does not cover and
// brings no fill for it leaves the rest of the page as the file holds it
// (zeros): right for a clone whose source reads zeros there (after a
// flatten), and the chunkserver refuses such writes from clients that read
// a source.
//
// Which pages are owned is kept in memory and written down at Sync, after
// the data: a file "chunk_<id>_own" beside the chunk holds two slots (each
// half a meta page, written alternately, the higher valid generation
// current) with a bitmap of the owned pages. So a bit is durable only after
// the data it stands for, and a crash loses only bits of writes since the
// last Sync, which the log replays: a replayed write finds its pages not
// owned and fills them again from the fill it carries, as it did the first
// time. The decisions depend on the write and on the bitmap, which every
// replica has alike.
//
// Slot layout, little-endian:
//
//	off len field
//	  0   8 magic "CAIRNCO1"
//	  8   4 format version (1)
//	 12   4 copy unit in bytes (a page of the bitmap)
//	 16   8 chunk id
//	 24   8 generation: the slot with the higher valid one is current
//	 32   …  bitmap: bit i set when page i is the chunk's own
//	 -4   4 CRC32C of the slot before it
const (
	ownMagic     = "CAIRNCO1"
	ownFormat    = 1
	ownHeaderLen = 32
	ownSuffix    = "_own"
)

// ErrFillMissing is returned by WriteClone for a write that covers part of
// a page and brings no fill for it while the chunk does not own the page.
var ErrFillMissing = errors.New("datastore: a partly written page of a clone's chunk needs its source's content")

// owned is what a clone's chunk owns.
type owned struct {
	path string

	mu    sync.Mutex
	bits  []byte // current
	saved []byte // as durable in slot gen
	gen   uint64
}

func (o *owned) has(i int64) bool { return o.bits[i/8]&(1<<(i%8)) != 0 }
func (o *owned) set(i int64)      { o.bits[i/8] |= 1 << (i % 8) }

func ownName(id uint64) string { return chunkName(id) + ownSuffix }

func parseOwnName(name string) (uint64, bool) {
	base, ok := strings.CutSuffix(name, ownSuffix)
	if !ok {
		return 0, false
	}
	return parseChunkName(base)
}

func encodeOwnSlot(id uint64, unit int64, gen uint64, bits []byte, slotSize int) []byte {
	b := make([]byte, slotSize)
	copy(b, ownMagic)
	binary.LittleEndian.PutUint32(b[8:], ownFormat)
	binary.LittleEndian.PutUint32(b[12:], uint32(unit))
	binary.LittleEndian.PutUint64(b[16:], id)
	binary.LittleEndian.PutUint64(b[24:], gen)
	copy(b[ownHeaderLen:], bits)
	binary.LittleEndian.PutUint32(b[slotSize-4:], crc32.Checksum(b[:slotSize-4], castagnoli))
	return b
}

func decodeOwnSlot(b []byte, id uint64, unit int64, bitmapLen int) (gen uint64, bits []byte, err error) {
	n := len(b)
	if n < ownHeaderLen+bitmapLen+4 {
		return 0, nil, fmt.Errorf("%w: own slot of %d bytes", ErrCorrupt, n)
	}
	if got, want := binary.LittleEndian.Uint32(b[n-4:]), crc32.Checksum(b[:n-4], castagnoli); got != want {
		return 0, nil, fmt.Errorf("%w: own slot CRC32C %08x, computed %08x", ErrCorrupt, got, want)
	}
	if string(b[:8]) != ownMagic || binary.LittleEndian.Uint32(b[8:]) != ownFormat ||
		int64(binary.LittleEndian.Uint32(b[12:])) != unit || binary.LittleEndian.Uint64(b[16:]) != id {
		return 0, nil, fmt.Errorf("%w: own slot header", ErrCorrupt)
	}
	return binary.LittleEndian.Uint64(b[24:]), slices.Clone(b[ownHeaderLen : ownHeaderLen+bitmapLen]), nil
}

// loadOwned reads the owned pages of clone chunk id. A missing file is a
// chunk created since the last Sync: it owns nothing durably yet.
func (s *Store) loadOwned(id uint64) (*owned, error) {
	o := &owned{path: filepath.Join(s.dir, ownName(id)), bits: make([]byte, s.bitmapLen())}
	page, err := os.ReadFile(o.path)
	if errors.Is(err, fs.ErrNotExist) {
		o.saved = slices.Clone(o.bits)
		return o, nil
	}
	if err != nil {
		return nil, fmt.Errorf("chunk %d: read own pages: %w", id, err)
	}
	if int64(len(page)) > s.geo.MetaPageSize {
		return nil, fmt.Errorf("%w: chunk %d: own file of %d bytes", ErrCorrupt, id, len(page))
	}
	if int64(len(page)) < s.geo.MetaPageSize {
		// Its first save was cut short: nothing was written down yet,
		// and the log replays every write since.
		page = append(page, make([]byte, s.geo.MetaPageSize-int64(len(page)))...)
	}
	half := len(page) / 2
	ga, a, errA := decodeOwnSlot(page[:half], id, s.unit, s.bitmapLen())
	gb, b, errB := decodeOwnSlot(page[half:], id, s.unit, s.bitmapLen())
	switch {
	case errA == nil && (errB != nil || ga > gb):
		o.gen, o.bits = ga, a
	case errB == nil:
		o.gen, o.bits = gb, b
	case allZero(page[:half]) || allZero(page[half:]):
		// The first save (generation 1, into the second slot) was cut
		// short: no slot was ever durable, nothing is owned durably.
	default:
		return nil, fmt.Errorf("chunk %d: both own slots are damaged: %w", id, errA)
	}
	o.saved = slices.Clone(o.bits)
	return o, nil
}

// attachOwned gives loaded clone chunks their owned pages and removes own
// files whose chunk is gone (a delete interrupted).
func (s *Store) attachOwned(files map[uint64]string) error {
	for id, path := range files {
		if c := s.mu.chunks[id]; c == nil || c.corrupt != nil || c.meta.Flags&MetaFlagClone == 0 {
			if c != nil && c.corrupt != nil {
				continue
			}
			if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("datastore: open: %w", err)
			}
		}
	}
	for id, c := range s.mu.chunks {
		if c.corrupt != nil || c.meta.Flags&MetaFlagClone == 0 {
			continue
		}
		o, err := s.loadOwned(id)
		if err != nil {
			c.corrupt = err
			s.log.Error("clone chunk's owned pages are unreadable; it will not be served", "chunk", id, "err", err)
			continue
		}
		c.own = o
	}
	return nil
}

// saveOwned writes the bits that were current before the chunk's data was
// fdatasynced (bits) to the slot after the current one, durably.
func (s *Store) saveOwned(c *chunk, bits []byte) error {
	o := c.own
	o.mu.Lock()
	defer o.mu.Unlock()
	if bytes.Equal(bits, o.saved) {
		return nil
	}
	half := s.geo.MetaPageSize / 2
	gen := o.gen + 1
	f, err := os.OpenFile(o.path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("chunk %d: own pages: %w", c.id, err)
	}
	defer f.Close()
	created := false
	if fi, err := f.Stat(); err == nil && fi.Size() < s.geo.MetaPageSize {
		created = true
		if err := f.Truncate(s.geo.MetaPageSize); err != nil {
			return fmt.Errorf("chunk %d: own pages: %w", c.id, err)
		}
	}
	if _, err := f.WriteAt(encodeOwnSlot(c.id, s.unit, gen, bits, int(half)), int64(gen%2)*half); err != nil {
		return fmt.Errorf("chunk %d: write own pages: %w", c.id, err)
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("chunk %d: fdatasync own pages: %w", c.id, err)
	}
	if created {
		if err := fsutil.SyncDir(s.dir); err != nil {
			return fmt.Errorf("chunk %d: own pages: %w", c.id, err)
		}
	}
	o.gen, o.saved = gen, bits
	return nil
}

// revertOwned sets a clone chunk's owned pages back to those last written
// down (Sync failed: what was filled since may be lost).
func (c *chunk) revertOwned() {
	if c.own == nil {
		return
	}
	c.own.mu.Lock()
	c.own.bits = slices.Clone(c.own.saved)
	c.own.mu.Unlock()
}

// ownedSnapshot returns a copy of the chunk's owned bits (nil: not a clone
// chunk).
func (c *chunk) ownedSnapshot() []byte {
	if c.own == nil {
		return nil
	}
	c.own.mu.Lock()
	defer c.own.mu.Unlock()
	return slices.Clone(c.own.bits)
}

// fillPages writes the fill's content into the pages it covers whole that
// a clone chunk does not own, and owns each once written (a concurrent
// read sees the source's content either way). c.mu held; the caller
// orders writes of the chunk.
func (s *Store) fillPages(c *chunk, h *handle, fill []byte, fillOff int64) error {
	c.data.Lock()
	defer c.data.Unlock()
	o := c.own
	o.mu.Lock()
	defer o.mu.Unlock()
	first, last := s.pages(fillOff, int64(len(fill)))
	for i := first; i <= last; i++ {
		po, pn := s.pageSpan(i)
		if o.has(i) || po < fillOff || po+pn > fillOff+int64(len(fill)) {
			continue
		}
		if _, err := h.f.WriteAt(fill[po-fillOff:po-fillOff+pn], s.geo.MetaPageSize+po); err != nil {
			return fmt.Errorf("fill page %d: %w", i, err)
		}
		o.set(i)
	}
	return nil
}

// ownRange owns the pages [off, off+n) touches, once their data is
// written: a read that finds a page owned finds its data.
func (s *Store) ownRange(c *chunk, off, n int64) {
	o := c.own
	o.mu.Lock()
	defer o.mu.Unlock()
	first, last := s.pages(off, n)
	for i := first; i <= last; i++ {
		o.set(i)
	}
}

// checkFill reports whether a write of [off, off+n) into a clone chunk
// brings the fill its partly covered pages need when not owned.
func (s *Store) checkFill(c *chunk, off, n int64, fill []byte, fillOff int64) error {
	if n == 0 {
		return nil
	}
	o := c.own
	first, last := s.pages(off, n)
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, i := range []int64{first, last} {
		po, pn := s.pageSpan(i)
		whole := off <= po && off+n >= po+pn
		if whole || o.has(i) {
			continue
		}
		if po < fillOff || po+pn > fillOff+int64(len(fill)) {
			return fmt.Errorf("%w: page %d of chunk %d", ErrFillMissing, i, c.id)
		}
	}
	return nil
}

// WriteClone writes p at off into a clone's chunk, creating it as a clone
// chunk (owning no page) if missing, under sequence numbers sn and keep as
// WriteAtSN. fill is the clone source's content of whole pages from
// fillOff: pages it covers that the chunk does not own take it before p is
// written. p may be empty (a fill alone, as flatten sends). A page p covers
// in part that the chunk does not own must be in the fill, else nothing is
// written and the error wraps ErrFillMissing. On a chunk that is not a
// clone's, the fill is ignored.
func (s *Store) WriteClone(id uint64, p []byte, off int64, sn, keep uint64, fill []byte, fillOff int64) error {
	if len(p) > 0 {
		if err := s.checkRange(len(p), off); err != nil {
			return fmt.Errorf("write chunk %d: %w", id, err)
		}
	}
	if len(fill) > 0 {
		if err := s.checkRange(len(fill), fillOff); err != nil {
			return fmt.Errorf("write chunk %d: fill: %w", id, err)
		}
	}
	if len(p) == 0 && len(fill) == 0 {
		return fmt.Errorf("write chunk %d: %w: nothing to write", id, ErrInvalidRange)
	}
	if fill == nil {
		fill = []byte{} // checked: a clone write must bring what it needs
	}
	for {
		c, err := s.lookup(id)
		if err != nil {
			return err
		}
		if c == nil {
			if c, err = s.create(id, sn, true); err != nil {
				return err
			}
		}
		retry, err := s.writeChunk(c, p, off, sn, keep, fill, fillOff)
		if !retry {
			return err
		}
	}
}

// ReadOwned reads like ReadAt and says which pages of the range a clone's
// chunk does not own: bit k of absent is set when page first+k (first being
// the page of off, in units of CopyUnit) reads from the clone's source; p
// holds zeros there. absent is nil for a chunk that owns every page of the
// range.
func (s *Store) ReadOwned(id uint64, p []byte, off int64) (absent []byte, err error) {
	if err := s.checkRange(len(p), off); err != nil {
		return nil, fmt.Errorf("read chunk %d: %w", id, err)
	}
	c, err := s.lookup(id)
	if err != nil {
		return nil, err
	}
	if c == nil {
		return nil, fmt.Errorf("read chunk %d: %w", id, ErrChunkNotExist)
	}
	// The bits and the data under one hold of the chunk's data lock: a
	// write owns its pages under it, so the bits say what the data holds.
	bits, err := s.readChunkOwned(c, p, off, true)
	if err != nil {
		return nil, err
	}
	if bits != nil {
		first, last := s.pages(off, int64(len(p)))
		for i := first; i <= last; i++ {
			if bits[i/8]&(1<<(i%8)) == 0 {
				if absent == nil {
					absent = make([]byte, (last-first+8)/8)
				}
				absent[(i-first)/8] |= 1 << ((i - first) % 8)
			}
		}
	}
	// A page not owned reads as zeros, whatever a fill that lost a race
	// with this read wrote into it meanwhile.
	for k := int64(0); absent != nil && k < int64(len(absent))*8; k++ {
		if absent[k/8]&(1<<(k%8)) == 0 {
			continue
		}
		po, pn := s.pageSpan(off/s.unit + k)
		lo, hi := max(po, off), min(po+pn, off+int64(len(p)))
		if lo < hi {
			clear(p[lo-off : hi-off])
		}
	}
	return absent, nil
}

// CopyUnit is the page size of the store's bitmaps (copies on write and a
// clone chunk's owned pages).
func (s *Store) CopyUnit() int64 { return s.unit }

// Owned returns a clone chunk's owned-page bitmap (a bit per CopyUnit page;
// nil for a chunk that is not a clone's): what a Raft snapshot moves
// beside the chunk's data.
func (s *Store) Owned(id uint64) ([]byte, error) {
	c, err := s.lookup(id)
	if err != nil {
		return nil, err
	}
	if c == nil {
		return nil, fmt.Errorf("chunk %d: %w", id, ErrChunkNotExist)
	}
	return c.ownedSnapshot(), nil
}

// SetOwned replaces the owned pages of a clone's chunk (a Raft snapshot's
// receiver sets the sender's once the chunk's data is written, since
// writing the data owned what it touched). They become durable at the
// next Sync, after the data.
func (s *Store) SetOwned(id uint64, bits []byte) error {
	if len(bits) != s.bitmapLen() {
		return fmt.Errorf("chunk %d: %w: owned bitmap of %d bytes, want %d", id, ErrInvalidRange, len(bits), s.bitmapLen())
	}
	c, err := s.lookup(id)
	if err != nil {
		return err
	}
	if c == nil {
		return fmt.Errorf("chunk %d: %w", id, ErrChunkNotExist)
	}
	if c.own == nil {
		return fmt.Errorf("chunk %d: %w: not a clone's chunk", id, ErrInvalidRange)
	}
	c.own.mu.Lock()
	c.own.bits = slices.Clone(bits)
	c.own.mu.Unlock()
	c.dirty.Store(true)
	return nil
}

// ZeroSN makes a clone's chunk read as zeros and own every page, as a
// write under sn and keep (a client's unmap of a whole chunk of a clone:
// deleting it would make it read from the source again). A missing chunk
// is created, empty. A chunk a live snapshot may read is zeroed through
// copy on write; any other is zeroed in place, never deleted (a read
// meanwhile would find no chunk and read the source).
func (s *Store) ZeroSN(id, sn, keep uint64) error {
	c, err := s.lookup(id)
	if err != nil {
		return err
	}
	if c == nil {
		_, err := s.create(id, sn, false)
		return err
	}
	if c.corrupt != nil {
		return fmt.Errorf("zero chunk %d: %w", id, c.corrupt)
	}
	if sn != 0 && keep != 0 && keep >= c.meta.CreatedSN {
		return s.DeleteSN(id, sn, keep) // every page written, so owned
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return fmt.Errorf("zero chunk %d: %w", id, c.gone)
	}
	c.cow.Lock()
	c.sn = max(c.sn, sn) // no snapshot needs what it held
	c.cow.Unlock()
	h, err := s.files.acquire(c)
	if err != nil {
		return fmt.Errorf("zero chunk %d: %w", id, err)
	}
	defer h.release()
	// Zero the range in place (the blocks stay allocated); a filesystem
	// without it gets zeros written.
	c.data.Lock()
	defer c.data.Unlock()
	if err := unix.Fallocate(h.fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, s.geo.MetaPageSize, s.geo.ChunkSize); err != nil {
		zeros := make([]byte, min(s.geo.ChunkSize, 1<<20))
		for off := int64(0); off < s.geo.ChunkSize; off += int64(len(zeros)) {
			n := min(int64(len(zeros)), s.geo.ChunkSize-off)
			if _, err := fsutil.WriteAtInPieces(h.f, zeros[:n], s.geo.MetaPageSize+off); err != nil {
				return fmt.Errorf("zero chunk %d: %w", id, err)
			}
		}
	}
	if c.own != nil {
		s.ownRange(c, 0, s.geo.ChunkSize)
	}
	c.dirty.Store(true)
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// notOwned returns the pages a clone's chunk does not own, for the
// version a cut keeps (nil for other chunks, or when the meta slot has no
// room for it: the MDS refuses snapshots of clones on such geometries).
func (s *Store) notOwned(c *chunk) []byte {
	bits := c.ownedSnapshot()
	if bits == nil {
		return nil
	}
	if !s.absentFits() {
		s.log.Error("a clone chunk's version cannot keep which pages were not its own (chunk too large for the meta page); its snapshots read its data there", "chunk", c.id)
		return nil
	}
	pages := (s.geo.ChunkSize + s.unit - 1) / s.unit
	out := make([]byte, len(bits))
	for i := range pages {
		if bits[i/8]&(1<<(i%8)) == 0 {
			out[i/8] |= 1 << (i % 8)
		}
	}
	return out
}

// absentFits reports whether a version slot has room for an absent bitmap
// beside its bitmap.
func (s *Store) absentFits() bool {
	return int64(versionHeaderLen+2*s.bitmapLen()+4) <= s.geo.MetaPageSize/2
}
