package ltx

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// DirReport is what VerifyDir found in a log directory.
type DirReport struct {
	Files    []FileInfo // the files that form the log, oldest first
	Stored   []Stored   // where each of Files is stored
	Problems []error    // each says which file and what is wrong
	Notes    []string   // things Open would tidy up, which are not damage
}

// OK reports whether no problem was found.
func (r *DirReport) OK() bool { return len(r.Problems) == 0 }

// VerifyDir checks a log directory without changing it: every LTX file
// decodes with a matching file checksum and agrees with its name, TXIDs run
// without gaps, each file applies at the checksum the file before it left,
// and each position sidecar reads and agrees with its file. It returns an
// error only if the directory cannot be read.
func VerifyDir(dir string) (*DirReport, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	r := &DirReport{}
	sidecars := map[string]bool{}
	stored := map[string]Stored{}
	indexes := map[string]bool{}
	for _, e := range entries {
		name := e.Name()
		switch {
		case e.IsDir():
			r.Notes = append(r.Notes, fmt.Sprintf("%s/: subdirectory, not part of the log", name))
		case strings.HasSuffix(name, tmpExt):
			r.Notes = append(r.Notes, fmt.Sprintf("%s: unfinished write, never part of the log; opening the log removes it", name))
		case strings.HasSuffix(name, posExt):
			sidecars[name] = true
		case strings.HasSuffix(name, ltxExt):
			if _, _, err := ParseName(name); err != nil {
				r.Problems = append(r.Problems, err)
				continue
			}
			info, err := VerifyFile(filepath.Join(dir, name))
			if err != nil {
				r.Problems = append(r.Problems, err)
				continue
			}
			r.Files = append(r.Files, *info)
			stored[info.Name] = Stored{Name: info.Name, Path: filepath.Join(dir, name), Size: info.Size}
		case strings.HasSuffix(name, idxExt):
			indexes[name] = true
		case strings.HasSuffix(name, segExt):
			delete(indexes, indexName(name))
			for _, e := range r.verifySegment(filepath.Join(dir, name)) {
				r.Files = append(r.Files, e.FileInfo)
				stored[e.Name] = Stored{Name: e.Name, Path: filepath.Join(dir, name), Segment: true, Offset: e.Offset, Size: e.Size}
			}
		default:
			r.Notes = append(r.Notes, fmt.Sprintf("%s: not an LTX file, ignored", name))
		}
	}
	slices.SortFunc(r.Files, func(a, b FileInfo) int {
		if c := cmp.Compare(a.Header.MinTXID, b.Header.MinTXID); c != 0 {
			return c
		}
		return cmp.Compare(b.Header.MaxTXID, a.Header.MaxTXID)
	})

	var chain []FileInfo
	for _, f := range r.Files {
		if n := len(chain); n > 0 {
			prev := chain[n-1]
			switch {
			case f.Header.MaxTXID <= prev.Header.MaxTXID:
				r.Notes = append(r.Notes, fmt.Sprintf("%s: superseded by compacted file %s; opening the log removes it", f.Name, prev.Name))
				continue
			case f.Header.MinTXID != prev.Header.MaxTXID+1:
				r.Problems = append(r.Problems, fmt.Errorf("%s: gap in TXIDs: the previous file, %s, ends at txid %s", f.Name, prev.Name, prev.Header.MaxTXID))
			case f.Header.PreApplyChecksum != prev.PostApplyChecksum:
				r.Problems = append(r.Problems, fmt.Errorf("%s: applies at checksum %s but the previous file, %s, leaves %s",
					f.Name, f.Header.PreApplyChecksum, prev.Name, prev.PostApplyChecksum))
			}
		}
		chain = append(chain, f)
	}
	r.Files = chain
	for _, f := range r.Files {
		r.Stored = append(r.Stored, stored[f.Name])
	}
	for name := range indexes {
		if !slices.ContainsFunc(entries, func(e os.DirEntry) bool { return e.Name() == strings.TrimSuffix(name, idxExt)+segExt }) {
			r.Notes = append(r.Notes, fmt.Sprintf("%s: index without its segment; opening the log removes it", name))
		}
	}

	for i := range r.Files {
		f := &r.Files[i]
		name := posName(f.Name)
		if !sidecars[name] {
			continue
		}
		delete(sidecars, name)
		if _, err := readPositions(filepath.Join(dir, name), f); err != nil {
			r.Problems = append(r.Problems, err)
		}
	}
	for name := range sidecars {
		r.Notes = append(r.Notes, fmt.Sprintf("%s: position sidecar without its LTX file; opening the log removes it", name))
	}
	var unsealed int
	for _, f := range r.Files {
		if f.Seal == 0 {
			unsealed++
		}
	}
	if unsealed > 0 {
		r.Notes = append(r.Notes, fmt.Sprintf("%d of %d files are not sealed (copied without extended attributes): "+
			"checked by decoding only, which misses changes to compressed bytes that decode to the same pages; opening the log seals them", unsealed, len(r.Files)))
	}
	return r, nil
}

// Err returns the problems as one error, or nil.
func (r *DirReport) Err() error { return errors.Join(r.Problems...) }

// verifySegment reads the segment at path and decodes each file its index
// records, adding what is wrong to r's problems, and returns the files
// that verify, up to the first that does not.
func (r *DirReport) verifySegment(path string) []SegmentEntry {
	rep, err := ReadSegment(path)
	if err != nil {
		r.Problems = append(r.Problems, err)
		return nil
	}
	for i, e := range rep.Entries {
		if err := verifyStored(Stored{Name: e.Name, Path: path, Segment: true, Offset: e.Offset, Size: e.Size}, e.Seal); err != nil {
			r.Problems = append(r.Problems, err)
			return rep.Entries[:i]
		}
	}
	if rep.Bad != nil {
		r.Problems = append(r.Problems, rep.Bad)
	} else if rep.Uncommitted > 0 {
		r.Notes = append(r.Notes, fmt.Sprintf("%s: %d bytes after its last committed file: an append in progress, or one that never committed; opening the log removes them",
			filepath.Base(path), rep.Uncommitted))
	}
	return rep.Entries
}

// verifyStored decodes the stored file in full, checking seal if not 0.
func verifyStored(st Stored, seal Checksum) error {
	f, err := OpenStored(st)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	if _, err := io.Copy(io.Discard, NewVerifyReader(f, seal)); err != nil {
		if st.Segment {
			return fmt.Errorf("verify %s in segment %s at offset %d: %w", st.Name, st.Path, st.Offset, err)
		}
		return fmt.Errorf("verify %s: %w", st.Path, err)
	}
	return nil
}

// OpenStored opens the bytes of a stored LTX file for reading: the file,
// or its part of a segment.
func OpenStored(st Stored) (io.ReadCloser, error) {
	f, err := os.Open(st.Path)
	if err != nil {
		return nil, err
	}
	if !st.Segment {
		return f, nil
	}
	return struct {
		io.Reader
		io.Closer
	}{io.NewSectionReader(f, st.Offset, st.Size), f}, nil
}
