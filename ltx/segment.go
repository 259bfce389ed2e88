package ltx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc64"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// A segment holds the log's transactions as they are committed: one
// append-only file of whole LTX files, each exactly the bytes the codec
// encodes (header to trailer, so any of them can be cut out and verified
// alone), and beside it an index with one fixed-size record per file:
//
//	txid (8) | offset (8) | size (8) | seal (8) |
//	WAL offset (8) | WAL salt 1 (4) | WAL salt 2 (4) | CRC-64/ISO of the 48 bytes before (8)
//
// all big-endian. The WAL fields repeat the file's header, so that Open can
// tell whether a file that does not read was one its writer can write again
// (see MayBeUnsynced) when its bytes are gone. The record is the commit: a file's bytes are written
// (and fsynced, when the transaction asks for it) before its record, and
// bytes past the last record are an append that never committed. The
// record's seal is the CRC-64/ISO of the file's raw bytes (see seal.go).
//
// Segments are named by the TXID of their first file,
// "%016x.segment" and "%016x.index". A segment's files are consecutive
// transactions; the log appends to one segment at a time and starts the
// next when it reaches SegmentSize bytes or SegmentAge, or when the next
// transaction does not follow its last (a file applied from another node
// came in between). A segment is removed once none of its files is in
// the log any more (pruned, compacted, replaced by a snapshot).
const (
	segExt = ".segment"
	idxExt = ".index"

	indexRecordSize = 56

	// DefaultSegmentSize is the size at which the log starts a new
	// segment; DefaultSegmentAge the age.
	DefaultSegmentSize = 16 << 20
	DefaultSegmentAge  = time.Minute
)

// segment is a segment file of the log and its index.
type segment struct {
	name  string // base name of the segment file
	first TXID

	// live counts the segment's files in the log; active is set while the
	// log appends to it. A segment that is neither is removed.
	live   atomic.Int32
	active atomic.Bool

	// The fields below belong to the appending writer, which holds l.wmu.
	f, idx   *os.File
	end      int64 // bytes of committed files
	n        int   // committed files (index records)
	gen      int   // appends started, committed or not
	created  time.Time
	unsynced bool                  // committed without an fsync of both files since the last Sync
	rec      [indexRecordSize]byte // the record being written
}

func segmentName(first TXID) string {
	return fmt.Sprintf("%016x%s", uint64(first), segExt)
}

func indexName(segName string) string { return strings.TrimSuffix(segName, segExt) + idxExt }

// ParseSegmentName returns the first TXID of the segment named name,
// "%016x.segment".
func ParseSegmentName(name string) (TXID, error) {
	hex := strings.TrimSuffix(name, segExt)
	n, err := strconv.ParseUint(hex, 16, 64)
	if len(hex) != 16 || err != nil || n == 0 {
		return 0, fmt.Errorf("invalid segment name %s: want 16 hex digits of its first txid, then %s", name, segExt)
	}
	return TXID(n), nil
}

// indexRecord is one record of a segment's index.
type indexRecord struct {
	txid      TXID
	off, size int64
	seal      Checksum
	wal       WALSegment // Offset, Salt1 and Salt2 only
}

// header returns what the record knows of its file's header.
func (r indexRecord) header() Header {
	return Header{MinTXID: r.txid, MaxTXID: r.txid, WALOffset: r.wal.Offset, WALSalt1: r.wal.Salt1, WALSalt2: r.wal.Salt2}
}

// marshal encodes r into b, indexRecordSize bytes, and returns it.
func (r indexRecord) marshal(b []byte) []byte {
	binary.BigEndian.PutUint64(b[0:], uint64(r.txid))
	binary.BigEndian.PutUint64(b[8:], uint64(r.off))
	binary.BigEndian.PutUint64(b[16:], uint64(r.size))
	binary.BigEndian.PutUint64(b[24:], uint64(r.seal))
	binary.BigEndian.PutUint64(b[32:], uint64(r.wal.Offset))
	binary.BigEndian.PutUint32(b[40:], r.wal.Salt1)
	binary.BigEndian.PutUint32(b[44:], r.wal.Salt2)
	binary.BigEndian.PutUint64(b[48:], crc64.Checksum(b[:48], crc64Table))
	return b
}

// unmarshalIndexRecord decodes b, indexRecordSize bytes, or reports why it
// does not read.
func unmarshalIndexRecord(b []byte) (indexRecord, error) {
	if got, want := crc64.Checksum(b[:48], crc64Table), binary.BigEndian.Uint64(b[48:]); got != want {
		return indexRecord{}, fmt.Errorf("record checksum %016x, want %016x", want, got)
	}
	r := indexRecord{
		txid: TXID(binary.BigEndian.Uint64(b[0:])),
		off:  int64(binary.BigEndian.Uint64(b[8:])),
		size: int64(binary.BigEndian.Uint64(b[16:])),
		seal: Checksum(binary.BigEndian.Uint64(b[24:])),
		wal: WALSegment{
			Offset: int64(binary.BigEndian.Uint64(b[32:])),
			Salt1:  binary.BigEndian.Uint32(b[40:]),
			Salt2:  binary.BigEndian.Uint32(b[44:]),
		},
	}
	if r.off < 0 || r.size < minFileSize || r.seal&ChecksumFlag == 0 {
		return indexRecord{}, fmt.Errorf("record out of range: offset %d, size %d, seal %s", r.off, r.size, r.seal)
	}
	return r, nil
}

// SegmentEntry is an LTX file inside a segment, as ReadSegment finds it.
type SegmentEntry struct {
	FileInfo
	Offset int64 // of its first byte in the segment
}

// SegmentReport is what ReadSegment found in a segment: the files its index
// commits, in order, and what follows them that is not part of it.
type SegmentReport struct {
	Path    string
	Entries []SegmentEntry
	// Bad, if not nil, is why the file after Entries (index record
	// BadRecord) does not read: a torn append, or corruption.
	Bad       error
	BadRecord int
	// Uncommitted is how many bytes follow the last file of Entries in
	// the segment (an append that never committed, or files after Bad).
	Uncommitted int64
	// Size is the segment file's size.
	Size int64

	records    [][]byte // every whole index record
	indexBytes int64    // the index file's size
}

// ReadSegment reads the index of the segment at path and the header and
// trailer of every file it records, stopping at the first that does not
// read. It changes nothing.
func ReadSegment(path string) (*SegmentReport, error) {
	first, err := ParseSegmentName(filepath.Base(path))
	if err != nil {
		return nil, err
	}
	seg, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = seg.Close() }()
	st, err := seg.Stat()
	if err != nil {
		return nil, err
	}
	idxPath := filepath.Join(filepath.Dir(path), indexName(filepath.Base(path)))
	idx, err := os.ReadFile(idxPath)
	if errors.Is(err, os.ErrNotExist) {
		idx, err = nil, nil // created before its index: holds nothing committed
	} else if err != nil {
		return nil, err
	}
	rep := &SegmentReport{Path: path, Size: st.Size(), indexBytes: int64(len(idx))}
	for i := range len(idx) / indexRecordSize {
		rep.records = append(rep.records, idx[i*indexRecordSize:(i+1)*indexRecordSize])
	}
	var end int64
	for i, b := range rep.records {
		r, err := unmarshalIndexRecord(b)
		if err == nil {
			switch {
			case r.txid != first+TXID(i):
				err = fmt.Errorf("records txid %s where txid %s belongs", r.txid, first+TXID(i))
			case r.off != end:
				err = fmt.Errorf("records offset %d where the file before it ends at %d", r.off, end)
			case r.off+r.size > st.Size():
				err = fmt.Errorf("records %d bytes at offset %d, past the segment's end (%d bytes)", r.size, r.off, st.Size())
			}
		}
		var info *FileInfo
		if err == nil {
			name := FormatName(r.txid, r.txid)
			info, err = readFileInfo(io.NewSectionReader(seg, r.off, r.size), name, r.size)
			if err == nil && (info.Header.MinTXID != r.txid || info.Header.MaxTXID != r.txid) {
				err = fmt.Errorf("the file there holds txid %s-%s", info.Header.MinTXID, info.Header.MaxTXID)
			}
		}
		if err != nil {
			rep.Bad, rep.BadRecord = fmt.Errorf("%w: segment %s, index %s record %d (txid %s, offset %d): %v",
				ErrCorrupt, path, idxPath, i, first+TXID(i), end, err), i
			break
		}
		info.Seal = r.seal
		rep.Entries = append(rep.Entries, SegmentEntry{FileInfo: *info, Offset: r.off})
		end = r.off + r.size
	}
	rep.Uncommitted = st.Size() - end
	return rep, nil
}

// openSegment reads the segment named name in the log directory: its
// committed files, with a torn last append cut off (bytes after the last
// index record; a last record or file that does not read when every file
// from it on may be unsynced, see MayBeUnsynced). Anything else that does
// not read is an error naming the segment and the offset. Caller holds
// l.wmu and l.mu, in Open.
func (l *Log) openSegment(name string) (*segment, []*logFile, error) {
	first, err := ParseSegmentName(name)
	if err != nil {
		return nil, nil, fmt.Errorf("log %s: %v: rename or move it out of the log directory", l.Dir, err)
	}
	rep, err := ReadSegment(l.path(name))
	if err != nil {
		return nil, nil, fmt.Errorf("log %s: %w", l.Dir, err)
	}
	n := len(rep.Entries)
	if rep.Bad != nil {
		// Whole records after the bad one are files committed after it:
		// cut off only if they may be unsynced too.
		if len(rep.records) > rep.BadRecord+1 && !l.laterUnsynced(rep) && !l.unfinishedGroup(first+TXID(rep.BadRecord)) {
			return nil, nil, fmt.Errorf("log %s: %w; it is not the last file, so the log cannot continue past it: "+
				"restore the log from a replica or a backup, or move the segment and every later file out of the directory", l.Dir, rep.Bad)
		}
		l.Logger.Warn("the last append to a segment does not read: a crash while writing it? It is cut off; it was never acknowledged",
			"db", l.Name, "segment", name, "err", rep.Bad)
	}
	s := &segment{name: name, first: first}
	end := int64(0)
	if n > 0 {
		end = rep.Entries[n-1].Offset + rep.Entries[n-1].Size
	}
	if rep.Uncommitted > 0 || rep.indexBytes != int64(n)*indexRecordSize {
		if err := l.cutSegment(s, n, end, rep.Size, rep.Bad != nil); err != nil {
			return nil, nil, err
		}
	}
	files := make([]*logFile, n)
	for i, e := range rep.Entries {
		files[i] = &logFile{info: e.FileInfo, seg: s, off: e.Offset}
	}
	s.live.Store(int32(n))
	return s, files, nil
}

// laterUnsynced reports whether the files recorded after rep's bad record
// may all be unsynced (see MayBeUnsynced), judged from their records: a
// file's bytes may be gone, its record not. A record that does not read
// is unknown, and unknown is not unsynced, unless it is the last: an
// append of the index torn by the crash.
func (l *Log) laterUnsynced(rep *SegmentReport) bool {
	if l.MayBeUnsynced == nil {
		return false
	}
	for i := rep.BadRecord; i < len(rep.records); i++ {
		r, err := unmarshalIndexRecord(rep.records[i])
		if err != nil {
			if i == len(rep.records)-1 {
				continue
			}
			return false
		}
		if !l.MayBeUnsynced(r.header()) {
			return false
		}
	}
	return true
}

// unfinishedGroup reports whether txid is in a group of files ApplyFiles
// was applying when it stopped: at or after the first file its marker
// names. Such a group's records may be on disk without its files' bytes
// (both are fsynced together, before the database is written and the
// group acknowledged): cut off, the log is where the database is.
func (l *Log) unfinishedGroup(txid TXID) bool {
	min, _, err := ParseName(l.applying)
	return err == nil && txid >= min
}

// cutSegment truncates segment s to its first n files, end bytes, and its
// index to n records, both fsynced. If keep, the bytes cut off (size in
// all), which hold committed files that do not read, are kept under the
// corrupt directory; else they are an append that never committed.
func (l *Log) cutSegment(s *segment, n int, end, size int64, keep bool) error {
	path := l.path(s.name)
	if size > end && !keep {
		l.Logger.Info("removed an unfinished append from the end of a segment", "db", l.Name, "segment", s.name, "offset", end, "bytes", size-end)
	}
	if size > end && keep {
		kept := filepath.Join(l.path(corruptDir), fmt.Sprintf("%s.%d", s.name, end))
		if err := copyRange(path, end, size-end, kept); err != nil {
			return fmt.Errorf("keep the unfinished end of segment %s: %w", path, err)
		}
		l.Logger.Warn("cut files that do not read off the end of a segment; they were never applied", "db", l.Name, "segment", s.name,
			"offset", end, "bytes", size-end, "kept_as", kept)
	}
	for _, c := range []struct {
		path string
		size int64
	}{{path, end}, {l.path(indexName(s.name)), int64(n) * indexRecordSize}} {
		f, err := os.OpenFile(c.path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		err = f.Truncate(c.size)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return diskError("cut", c.path, err)
		}
	}
	return nil
}

// copyRange copies n bytes at off of the file at src to a new file dst,
// fsynced.
func copyRange(src string, off, n int64, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer func() { _ = in.Close() }()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err = io.Copy(out, io.NewSectionReader(in, off, n)); err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return syncDirectory(filepath.Dir(dst))
}

// appending returns the segment the transaction txid is appended to,
// starting a new one if there is none, the current one is full or old, or
// txid does not follow its last file. Caller holds l.wmu.
func (l *Log) appending(txid TXID, sync bool) (*segment, error) {
	s := l.seg
	if s != nil && txid == s.first+TXID(s.n) && s.end < l.SegmentSize && (l.SegmentAge <= 0 || time.Since(s.created) < l.SegmentAge) {
		return s, nil
	}
	if s != nil && s.n == 0 && txid == s.first {
		return s, nil // started, nothing committed to it yet
	}
	if err := l.rollSegment(); err != nil {
		return nil, err
	}
	s = &segment{name: segmentName(txid), first: txid, created: time.Now()}
	var err error
	if s.f, err = os.OpenFile(l.path(s.name), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644); err != nil {
		return nil, diskError("create segment", l.path(s.name), err)
	}
	if s.idx, err = os.OpenFile(l.path(indexName(s.name)), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644); err != nil {
		_ = s.f.Close()
		_ = os.Remove(l.path(s.name))
		return nil, diskError("create segment index", l.path(indexName(s.name)), err)
	}
	if sync {
		if err := syncDirectory(l.Dir); err != nil {
			s.close()
			return nil, err
		}
	} else {
		l.dirUnsynced = true
	}
	s.active.Store(true)
	l.seg = s
	return s, nil
}

// rollSegment stops appending to the current segment, if any: it is
// synced if it has unsynced files, closed, and removed if the log holds
// none of its files. Caller holds l.wmu.
func (l *Log) rollSegment() error {
	s := l.seg
	if s == nil {
		return nil
	}
	if err := l.settle(); err != nil {
		return err
	}
	if s.unsynced {
		if err := s.sync(); err != nil {
			return err
		}
	}
	s.close()
	l.seg = nil
	s.active.Store(false)
	if s.live.Load() == 0 {
		return l.removeSegment(s)
	}
	return nil
}

func (s *segment) close() {
	_ = s.f.Close()
	_ = s.idx.Close()
}

// sync fsyncs the segment, then its index.
func (s *segment) sync() error {
	if err := unix.Fdatasync(int(s.f.Fd())); err != nil {
		return diskError("sync", s.f.Name(), err)
	}
	if err := unix.Fdatasync(int(s.idx.Fd())); err != nil {
		return diskError("sync", s.idx.Name(), err)
	}
	s.unsynced = false
	return nil
}

// removeSegment removes a segment none of whose files is in the log. Its
// readers keep reading: the bytes go when they close it.
func (l *Log) removeSegment(s *segment) error {
	if err := removeIfExists(l.path(indexName(s.name))); err != nil {
		return err
	}
	return removeIfExists(l.path(s.name))
}

// segmentAppend is an LTX file written at the end of a segment, not yet
// committed to it: its index record is not written.
type segmentAppend struct {
	l      *Log
	s      *segment
	gen    int
	txid   TXID
	off    int64
	size   int64
	seal   Checksum
	wal    WALSegment
	synced bool
}

// writeSegment writes the LTX file of transaction txid, produced by write,
// at the end of the segment it goes into, sealed, and fdatasynced if sync.
// Caller holds l.wmu.
func (l *Log) writeSegment(txid TXID, wal WALSegment, sync bool, write func(w io.Writer) error) (*segmentAppend, error) {
	s, err := l.appending(txid, sync)
	if err != nil {
		return nil, err
	}
	return l.appendTo(s, txid, wal, sync, write)
}

// appendTo is writeSegment to segment s, which the caller got from
// appending for a transaction at or before txid. Caller holds l.wmu.
func (l *Log) appendTo(s *segment, txid TXID, wal WALSegment, sync bool, write func(w io.Writer) error) (*segmentAppend, error) {
	s.gen++
	size, seal, err := writeSealed(io.NewOffsetWriter(s.f, s.end), write)
	if err != nil {
		return nil, diskError("write", fmt.Sprintf("%s at offset %d", s.f.Name(), s.end), err)
	}
	failpoint("write")
	a := &segmentAppend{l: l, s: s, gen: s.gen, txid: txid, off: s.end, size: size, seal: seal, wal: wal, synced: sync}
	if sync {
		if err := unix.Fdatasync(int(s.f.Fd())); err != nil {
			return nil, diskError("sync", s.f.Name(), err)
		}
		failpoint("sync")
	}
	return a, nil
}

// commit writes a's index record, which makes it part of the segment, and
// fsyncs the index if syncIndex. Caller holds l.wmu.
func (a *segmentAppend) commit(syncIndex bool) error {
	s := a.s
	if a.l.seg != s || s.gen != a.gen || s.end != a.off {
		return fmt.Errorf("segment %s: the file for txid %s at offset %d was written over by a later append", s.name, a.txid, a.off)
	}
	rec := indexRecord{txid: a.txid, off: a.off, size: a.size, seal: a.seal, wal: a.wal}
	if _, err := s.idx.WriteAt(rec.marshal(s.rec[:]), int64(s.n)*indexRecordSize); err != nil {
		return diskError("write", s.idx.Name(), err)
	}
	failpoint("rename")
	if syncIndex {
		if err := unix.Fdatasync(int(s.idx.Fd())); err != nil {
			return diskError("sync", s.idx.Name(), err)
		}
		failpoint("syncdir")
	}
	s.end += a.size
	s.n++
	if !a.synced || !syncIndex {
		s.unsynced = true
	}
	return nil
}

// syncBoth fdatasyncs the segment and its index at once, and also, if
// not nil, another file.
func (s *segment) syncBoth(also *os.File) error {
	err := s.syncFiles(also)
	if err == nil {
		s.unsynced = false
	}
	return err
}

// syncFiles is syncBoth that leaves s.unsynced as it is, for a goroutine
// of its own (see Log.settle).
func (s *segment) syncFiles(also *os.File) error {
	files := []*os.File{s.f, s.idx}
	if also != nil {
		files = append(files, also)
	}
	errc := make(chan error, len(files))
	for _, f := range files[1:] {
		go func() { errc <- fdatasync(f) }()
	}
	err := fdatasync(files[0])
	for range files[1:] {
		err = errors.Join(err, <-errc)
	}
	return err
}

// fdatasync is fdatasync(2) of f, with an error that names it.
func fdatasync(f *os.File) error {
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return diskError("sync", f.Name(), err)
	}
	return nil
}

// truncate takes s back to its first n files, end bytes: the records of
// a group whose apply failed before it wrote the database. Caller holds
// l.wmu.
func (s *segment) truncate(n int, end int64) error {
	s.gen++
	if err := s.idx.Truncate(int64(n) * indexRecordSize); err != nil {
		return diskError("truncate", s.idx.Name(), err)
	}
	s.n, s.end = n, end
	if err := s.f.Truncate(end); err != nil {
		return diskError("truncate", s.f.Name(), err)
	}
	return nil
}
