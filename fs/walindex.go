package fs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
)

// The wal-index: SQLite's commit point in WAL mode.
//
// A frame in the WAL, even a valid commit frame, is committed only once
// the writer has set the wal-index header's mxFrame past it, in the -shm,
// while it holds the WAL write lock. A writer killed between writing its
// commit frame (or in its fsync) and updating the header leaves frames
// that look committed: as long as some connection keeps the wal-index
// alive, they are not, and the next writer writes over them. Only when no
// connection holds the wal-index does the next one's recovery decide, from
// the frames alone, as readWAL does.
//
// When the -shm is served by passthrough its pages are those of the
// backing file, so the daemon reads the header as SQLite has just written
// it there; otherwise it asks the kernel for its cached page of the -shm
// (shmCache). Either way it takes transactions only up to its mxFrame
// (see scanWAL).

// shmCache reads a -shm served by the daemon: SQLite maps it, so what it
// writes is in the kernel's page cache of the -shm's node, and reaches the
// backing file only when the kernel writes the page back. The daemon reads
// the cached page (FUSE_NOTIFY_RETRIEVE), or the backing file when the
// kernel caches none (nobody maps it, or the node is gone).
type shmCache struct {
	d       *DB
	backing io.ReaderAt
}

func (c shmCache) ReadAt(p []byte, off int64) (int, error) {
	if node := c.d.shmNode.Load(); node != 0 && c.d.retrieve != nil {
		if n, st := c.d.retrieve(node, off, p); st.Ok() && n == len(p) {
			return n, nil
		}
	}
	return c.backing.ReadAt(p, off)
}

// walIndexHeaderSize is the size of one copy of the wal-index header; the
// -shm begins with two copies of it.
const walIndexHeaderSize = 48

// walIndexVersion is the header's iVersion.
const walIndexVersion = 3007000

// walIndexHeader is what capture reads of the wal-index header (SQLite's
// WalIndexHdr, in the machine's byte order).
type walIndexHeader struct {
	mxFrame int64   // frames of the WAL that are committed
	salt    [8]byte // the WAL header's salts, as bytes, when it was written
}

// errWalIndexBusy says that the two copies of the header differ: a writer
// is updating it.
var errWalIndexBusy = errors.New("wal-index header being written")

// readWalIndexHeader reads the wal-index header at the start of a -shm as
// SQLite's walIndexTryHdr does: the two copies must be equal, initialized,
// of the known version and with a valid checksum. ok is false when there
// is no header to read (no -shm, or one not initialized: the next
// connection recovers the WAL from its frames).
func readWalIndexHeader(r io.ReaderAt) (h walIndexHeader, ok bool, err error) {
	var b [2 * walIndexHeaderSize]byte
	if n, err := r.ReadAt(b[:], 0); n < len(b) {
		if err != nil && err != io.EOF {
			return h, false, fmt.Errorf("read the wal-index header: %w", err)
		}
		return h, false, nil
	}
	h1, h2 := b[:walIndexHeaderSize], b[walIndexHeaderSize:]
	if !bytes.Equal(h1, h2) {
		return h, false, errWalIndexBusy
	}
	order := binary.NativeEndian
	if h1[12] == 0 { // isInit
		return h, false, nil
	}
	if v := order.Uint32(h1[0:]); v != walIndexVersion {
		return h, false, fmt.Errorf("wal-index header: version %d, want %d", v, walIndexVersion)
	}
	if s1, s2 := walIndexChecksum(h1); s1 != order.Uint32(h1[40:]) || s2 != order.Uint32(h1[44:]) {
		return h, false, errWalIndexBusy
	}
	h.mxFrame = int64(order.Uint32(h1[16:]))
	copy(h.salt[:], h1[32:40])
	return h, true, nil
}

// uninitWalIndex marks the wal-index header of the -shm at path
// uninitialized (isInit 0 in both copies): the next connection that reads
// it rebuilds the wal-index from the WAL, as SQLite's recovery does after
// a crash (walIndexReadHdr, walIndexRecover). A -shm written by
// passthrough is the one SQLite's connections map.
func uninitWalIndex(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	for _, off := range []int64{12, walIndexHeaderSize + 12} {
		if _, err := f.WriteAt([]byte{0}, off); err != nil {
			return fmt.Errorf("mark the wal-index of %s for recovery: %w", path, err)
		}
	}
	return nil
}

// walIndexChecksum returns the checksum of a wal-index header copy h (its
// first 40 bytes, in the machine's byte order, as SQLite's
// walIndexWriteHdr computes it; bigEndCksum is about WAL frames).
func walIndexChecksum(h []byte) (s1, s2 uint32) {
	order := binary.NativeEndian
	for i := 0; i < 40; i += 8 {
		s1 += order.Uint32(h[i:]) + s2
		s2 += order.Uint32(h[i+4:]) + s1
	}
	return s1, s2
}

// walIndexRetries bounds how often walIndexLimit reads a header that a
// writer is updating; SQLite's own readers retry the same way.
const walIndexRetries = 100

// walIndexLimit returns how many frames of the current WAL SQLite has
// committed, by its wal-index, when capture can read it (a -shm that holds
// a header). gated is false otherwise: then the frames decide, as in
// recovery. Caller holds d.mu.
func (d *DB) walIndexLimit() (limit int64, gated bool, err error) {
	if !d.wal.valid {
		return 0, false, nil
	}
	file, err := os.Open(d.path(shmFile))
	if errors.Is(err, os.ErrNotExist) {
		return 0, false, nil
	} else if err != nil {
		return 0, false, err
	}
	defer func() { _ = file.Close() }()
	var f io.ReaderAt = file
	if !d.shmPassthrough.Load() {
		f = shmCache{d, file}
	}
	for try := 0; ; try++ {
		h, ok, err := readWalIndexHeader(f)
		if errors.Is(err, errWalIndexBusy) && try < walIndexRetries {
			runtime.Gosched()
			continue
		}
		if errors.Is(err, errWalIndexBusy) {
			// Still being written: take nothing new now; the writer's
			// unlock, or the next scan, finds the commit.
			return d.wal.mxFrame, true, nil
		} else if err != nil || !ok {
			return 0, false, err
		}
		var salt [8]byte
		binary.BigEndian.PutUint32(salt[0:], d.wal.hdr.salt1)
		binary.BigEndian.PutUint32(salt[4:], d.wal.hdr.salt2)
		if h.salt != salt {
			// A writer is restarting the WAL: it gave the wal-index new
			// salts (and no frames) before it writes the WAL's new
			// header, and may yet fail. Every frame of the old
			// generation was committed and checkpointed, and so taken;
			// nothing new is committed until the two agree.
			return d.wal.mxFrame, true, nil
		}
		return h.mxFrame, true, nil
	}
}
