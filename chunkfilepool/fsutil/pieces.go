package fsutil

import "os"

// PieceSize is the largest piece WriteAtInPieces writes with one system
// call.
const PieceSize = 64 << 10

// WriteAtInPieces writes p at off of f like f.WriteAt, in pieces that never
// cross a PieceSize boundary of the file.
//
// The page cache sizes the folio it creates for a buffered write by the
// length of the write: one 1 MiB pwrite into uncached pages makes one 1 MiB
// folio. Every later write into that folio walks all of its buffer heads, so
// a 4 KiB overwrite of a chunk first written in large writes costs several
// times one into small folios (ext4 on Linux 6.18: ~15 µs against ~4 µs of
// CPU per 4 KiB pwrite over a 1 GiB file), and creating the large folio
// costs more than creating sixteen 64 KiB ones. Chunk files are overwritten
// in small pieces all their life, so their data is written in pieces of at
// most 64 KiB: fifteen more system calls per MiB, each far cheaper than what
// it saves.
func WriteAtInPieces(f *os.File, p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		at := off + int64(done)
		n := min(len(p)-done, int(PieceSize-at%PieceSize))
		w, err := f.WriteAt(p[done:done+n], at)
		done += w
		if err != nil {
			return done, err
		}
	}
	return done, nil
}
