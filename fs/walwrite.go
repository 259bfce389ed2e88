package fs

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"os"
)

// Writing a WAL and its wal-index as SQLite's writer does.
//
// A replica applies a WAL-mode database's transactions as SQLite itself
// would commit them: it appends the pages as frames to the WAL and then
// publishes them in the wal-index (the -shm), while it holds the WAL write
// lock. Readers are never held off by an apply: a read transaction keeps
// the snapshot it began with (its read mark), and the next one sees the
// new frames. Frames reach the database file in checkpoints, which copy
// only frames every reader's snapshot already includes, and the WAL starts
// over once no reader uses it (see apply_wal.go). The formats are SQLite's
// (https://www.sqlite.org/walformat.html): the -shm is a sequence of 32 KiB
// blocks, the first starting with two copies of the 48-byte header and the
// 40 bytes of checkpoint information, each holding the page number of
// every frame it covers and a hash table from page numbers to frames.

const (
	walIndexBlockSize = 32768
	walIndexHdrBytes  = 2*walIndexHeaderSize + 40 // headers and checkpoint info
	hashNPage         = 4096                      // frames covered by a block
	hashNSlot         = 2 * hashNPage             // hash slots of a block
	hashNPageOne      = hashNPage - walIndexHdrBytes/4
	readMarkNotUsed   = 0xffffffff
	walNReader        = 5 // read marks, and READ locks

	// Byte offsets in the -shm of the checkpoint information.
	shmBackfill = 2 * walIndexHeaderSize
	shmReadMark = shmBackfill + 4
)

// walIndexBlock returns the wal-index block that covers frame iFrame
// (counted from 1), and the number of frames before the block.
func walIndexBlock(iFrame uint32) (block int64, zero uint32) {
	block = int64((iFrame + hashNPage - hashNPageOne - 1) / hashNPage)
	if block > 0 {
		zero = hashNPageOne + uint32(block-1)*hashNPage
	}
	return block, zero
}

// walIndexPgnos is the offset in the -shm of the first page number of
// block; its hash table starts at walIndexHash.
func walIndexPgnos(block int64) int64 {
	if block == 0 {
		return walIndexHdrBytes
	}
	return block * walIndexBlockSize
}

func walIndexHash(block int64) int64 { return block*walIndexBlockSize + hashNPage*4 }

// walHashSlot is SQLite's walHash: the first hash slot tried for pgno.
func walHashSlot(pgno uint32) uint32 { return (pgno * 383) & (hashNSlot - 1) }

// appendWalIndex adds frames mxFrame+1 onward, of pages pgnos, to the
// hash tables of the wal-index in shm, as SQLite's walIndexAppend does:
// entries a writer left past mxFrame without committing them are removed
// first, and a block is cleared when its first frame is written. The -shm
// grows as needed. Readers look frames up only to their snapshot's last
// frame, so entries past it change nothing they see.
func appendWalIndex(shm *os.File, mxFrame uint32, pgnos []uint32) (grew bool, err error) {
	order := binary.NativeEndian
	var (
		buf   []byte
		cur   = int64(-1)
		start int64
	)
	flush := func() error {
		if cur < 0 {
			return nil
		}
		if _, err := shm.WriteAt(buf, start); err != nil {
			return fmt.Errorf("write wal-index block %d: %w", cur, err)
		}
		return nil
	}
	defer func() {
		if err != nil {
			grew = false
		}
	}()
	for i, pgno := range pgnos {
		iFrame := mxFrame + uint32(i) + 1
		block, zero := walIndexBlock(iFrame)
		if block != cur {
			if err := flush(); err != nil {
				return grew, err
			}
			cur, start = block, walIndexPgnos(block)
			end := (block + 1) * walIndexBlockSize
			g, err := growShm(shm, end)
			if err != nil {
				return grew, err
			}
			grew = grew || g
			buf = make([]byte, end-start)
			if _, err := shm.ReadAt(buf, start); err != nil && err != io.EOF {
				return grew, fmt.Errorf("read wal-index block %d: %w", block, err)
			}
		}
		hashAt := walIndexHash(block) - start
		aPgno, aHash := buf[:hashAt], buf[hashAt:]
		idx := iFrame - zero
		if idx == 1 {
			clear(buf)
		}
		if order.Uint32(aPgno[(idx-1)*4:]) != 0 {
			// Left by a writer that died before committing: SQLite's
			// walCleanupHash.
			for s := 0; s < hashNSlot; s++ {
				if uint32(order.Uint16(aHash[2*s:])) >= idx {
					order.PutUint16(aHash[2*s:], 0)
				}
			}
			clear(aPgno[(idx-1)*4:])
		}
		slot, collide := walHashSlot(pgno), idx
		for order.Uint16(aHash[2*slot:]) != 0 {
			if collide == 0 {
				return grew, fmt.Errorf("wal-index block %d: hash table full", block)
			}
			collide--
			slot = (slot + 1) & (hashNSlot - 1)
		}
		order.PutUint32(aPgno[(idx-1)*4:], pgno)
		order.PutUint16(aHash[2*slot:], uint16(idx))
	}
	return grew, flush()
}

// growShm makes the -shm at least size bytes long, and reports whether it
// grew. SQLite's readers map only as much of it as fstat says it has: the
// kernel's cached size of the mount's -shm must go (DB.shmResized).
func growShm(shm *os.File, size int64) (bool, error) {
	fi, err := shm.Stat()
	if err != nil {
		return false, err
	}
	if fi.Size() >= size {
		return false, nil
	}
	if err := shm.Truncate(size); err != nil {
		return false, fmt.Errorf("grow the -shm to %d bytes: %w", size, err)
	}
	return true, nil
}

// walIndexHdr is the wal-index header a writer publishes.
type walIndexHdr struct {
	change   uint32 // iChange: moves with every commit
	pageSize uint32
	mxFrame  uint32
	nPage    uint32 // database size in pages
	frameSum [2]uint32
	salt     [8]byte // the WAL header's salts, as bytes
}

// encode returns one copy of the header, checksummed.
func (h walIndexHdr) encode() []byte {
	b := make([]byte, walIndexHeaderSize)
	order := binary.NativeEndian
	order.PutUint32(b[0:], walIndexVersion)
	order.PutUint32(b[8:], h.change)
	b[12] = 1 // isInit
	if nativeBigEndian {
		b[13] = 1 // bigEndCksum
	}
	order.PutUint16(b[14:], uint16(h.pageSize&0xff00|h.pageSize>>16))
	order.PutUint32(b[16:], h.mxFrame)
	order.PutUint32(b[20:], h.nPage)
	order.PutUint32(b[24:], h.frameSum[0])
	order.PutUint32(b[28:], h.frameSum[1])
	copy(b[32:40], h.salt[:])
	s1, s2 := walIndexChecksum(b)
	order.PutUint32(b[40:], s1)
	order.PutUint32(b[44:], s2)
	return b
}

// writeWalIndexHdr publishes h as SQLite's walIndexWriteHdr does: the
// second copy first, so a reader that reads the first and then the second
// sees them differ while the header changes, and tries again.
func writeWalIndexHdr(shm *os.File, h walIndexHdr) error {
	b := h.encode()
	if _, err := shm.WriteAt(b, walIndexHeaderSize); err != nil {
		return fmt.Errorf("write the wal-index header: %w", err)
	}
	if _, err := shm.WriteAt(b, 0); err != nil {
		return fmt.Errorf("write the wal-index header: %w", err)
	}
	return nil
}

// readWalIndexChange returns the change counter of the wal-index header in
// shm, 0 without a valid one.
func readWalIndexChange(shm io.ReaderAt) uint32 {
	var b [walIndexHeaderSize]byte
	if _, err := shm.ReadAt(b[:], 0); err != nil || b[12] == 0 {
		return 0
	}
	return binary.NativeEndian.Uint32(b[8:])
}

// nativeBigEndian reports whether this machine is big-endian: SQLite
// checksums a WAL it creates in the machine's byte order.
var nativeBigEndian = binary.NativeEndian.Uint16([]byte{0, 1}) == 1

// newWALHeader returns the header of a new WAL generation, salt1 following
// the last one's as SQLite's does and salt2 random; with no last one
// (last nil) both are random.
func newWALHeader(pageSize uint32, last *walHeader) ([]byte, walHeader, error) {
	b := make([]byte, walHeaderSize)
	magic := uint32(walMagicLE)
	if nativeBigEndian {
		magic = walMagicBE
	}
	binary.BigEndian.PutUint32(b[0:], magic)
	binary.BigEndian.PutUint32(b[4:], walIndexVersion)
	ps := pageSize
	if ps == 65536 {
		ps = 1
	}
	binary.BigEndian.PutUint32(b[8:], ps)
	if _, err := rand.Read(b[16:24]); err != nil {
		return nil, walHeader{}, err
	}
	if last != nil {
		binary.BigEndian.PutUint32(b[12:], last.seq+1)
		binary.BigEndian.PutUint32(b[16:], last.salt1+1)
	}
	s1, s2 := walChecksum(nativeBigEndian, b[:24], 0, 0)
	binary.BigEndian.PutUint32(b[24:], s1)
	binary.BigEndian.PutUint32(b[28:], s2)
	h, err := parseWALHeader(b)
	return b, h, err
}

// encodeFrames returns the frames of one transaction, pages (page number
// and bytes, the page size of h each) in order, the last one its commit
// frame with the database size commit, chained from the checksum s1, s2.
// It returns the checksum after the last frame.
func encodeFrames(h walHeader, pgnos []uint32, pages [][]byte, commit uint32, s1, s2 uint32) ([]byte, uint32, uint32) {
	fs := h.frameSize()
	buf := make([]byte, int64(len(pgnos))*fs)
	for i, pgno := range pgnos {
		fr := buf[int64(i)*fs : int64(i+1)*fs]
		binary.BigEndian.PutUint32(fr[0:], pgno)
		if i == len(pgnos)-1 {
			binary.BigEndian.PutUint32(fr[4:], commit)
		}
		binary.BigEndian.PutUint32(fr[8:], h.salt1)
		binary.BigEndian.PutUint32(fr[12:], h.salt2)
		copy(fr[walFrameHeaderSize:], pages[i])
		s1, s2 = walChecksum(h.bigEndian, fr[:8], s1, s2)
		s1, s2 = walChecksum(h.bigEndian, fr[walFrameHeaderSize:], s1, s2)
		binary.BigEndian.PutUint32(fr[16:], s1)
		binary.BigEndian.PutUint32(fr[20:], s2)
	}
	return buf, s1, s2
}

// saltBytes returns the salts of h as the WAL header stores them.
func (h walHeader) saltBytes() [8]byte {
	var b [8]byte
	binary.BigEndian.PutUint32(b[0:], h.salt1)
	binary.BigEndian.PutUint32(b[4:], h.salt2)
	return b
}
