package ltx

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// Spares is a pool of files that are no longer needed, kept to be written
// over instead of creating new files. A log writes one small file per
// transaction and removes as many when it compacts and prunes; creating a
// file is by far the costliest part of that on some filesystems (ext4
// without a journal skips every inode freed in the last minutes when it
// allocates one, so the cost of a create grows with the rate of deletes).
// Overwriting a spare and renaming it into place costs a fraction.
//
// The pool lives in one directory, on the same filesystem as the files
// that go into it; every file in it is a spare, whatever it holds. A nil
// *Spares is an empty pool that keeps nothing.
type Spares struct {
	dir string
	max int

	mu   sync.Mutex
	free []string // names in dir
	next int      // number for the next name
}

// OpenSpares opens the pool kept in dir, creating the directory if needed,
// with the files already in it. It keeps at most limit files; files past it
// are removed.
func OpenSpares(dir string, limit int) (*Spares, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("spare files: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("spare files: %w", err)
	}
	s := &Spares{dir: dir, max: limit}
	for _, e := range entries {
		name := e.Name()
		n, err := strconv.Atoi(name)
		if !e.Type().IsRegular() || err != nil || len(s.free) >= limit {
			if err := os.RemoveAll(filepath.Join(dir, name)); err != nil {
				return nil, fmt.Errorf("spare files: %w", err)
			}
			continue
		}
		s.free = append(s.free, name)
		s.next = max(s.next, n+1)
	}
	return s, nil
}

// Dir returns the pool's directory.
func (s *Spares) Dir() string { return s.dir }

// Len returns the number of spare files.
func (s *Spares) Len() int {
	if s == nil {
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.free)
}

// Take returns the path of a spare file, which is now the caller's to
// write over and rename, or "" if there is none.
func (s *Spares) Take() string {
	if s == nil {
		return ""
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.free)
	if n == 0 {
		return ""
	}
	name := s.free[n-1]
	s.free = s.free[:n-1]
	return filepath.Join(s.dir, name)
}

// Put empties the file at path and moves it into the pool, or removes it
// if the pool is full. A missing file is not an error. The file must not be open for
// reading anywhere it matters: it will be written over.
func (s *Spares) Put(path string) error {
	if s == nil {
		return removeIfExists(path)
	}
	s.mu.Lock()
	if len(s.free) >= s.max {
		s.mu.Unlock()
		return removeIfExists(path)
	}
	name := strconv.Itoa(s.next)
	s.next++
	s.mu.Unlock()
	// Emptied: a spare keeps an inode, not disk space.
	if err := os.Truncate(path, 0); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	if err := os.Rename(path, filepath.Join(s.dir, name)); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	s.mu.Lock()
	s.free = append(s.free, name)
	s.mu.Unlock()
	return nil
}

// Fill creates empty spare files until the pool holds n (at most its
// limit), so that a log that has removed no file yet, on a new node or in
// a burst, writes over spares too. It creates them in batches and rests
// after each batch as long as the batch took, so it uses at most half of
// a CPU; it stops when ctx is done. It returns how many files it created.
func (s *Spares) Fill(ctx context.Context, n int) (int, error) {
	if s == nil {
		return 0, nil
	}
	const batch = 32
	created := 0
	began := time.Now()
	for {
		s.mu.Lock()
		if len(s.free) >= min(n, s.max) {
			s.mu.Unlock()
			return created, nil
		}
		s.mu.Unlock()
		if created > 0 && created%batch == 0 {
			t := time.NewTimer(time.Since(began))
			select {
			case <-ctx.Done():
				t.Stop()
				return created, ctx.Err()
			case <-t.C:
			}
			began = time.Now()
		}
		s.mu.Lock()
		name := strconv.Itoa(s.next)
		s.next++
		s.mu.Unlock()
		f, err := os.OpenFile(filepath.Join(s.dir, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return created, fmt.Errorf("spare files: %w", err)
		}
		if err := f.Close(); err != nil {
			return created, fmt.Errorf("spare files: %w", err)
		}
		s.mu.Lock()
		s.free = append(s.free, name)
		s.mu.Unlock()
		created++
	}
}

func removeIfExists(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}
